"""Call-interleaved speed of two engines in one process: `old` with the tied lm_head prepacked
(`engine.UNPACK_TIED = False`, the code before) and `new` (unpacked, read from the weights mapping).

    PYTHONPATH=. python docs/results/rss_speed.py DIR --context 512,2048,7680 --steps 32 --batch 1,4 [--json OUT]

Per context: both engines prefill the same ids with `PrefillJob` (chunk 512), chunk by chunk
alternately (order flipped every chunk); then `--steps` decode_shared calls per batch size, one
engine's call after the other's (order flipped every step). Batch > 1 rows decode the prompt's KV
copied into every row. Asserts the last-token logits give the same argmax on both and reports their
largest difference. Prints medians; "ratio" is the median over adjacent pairs of new/old."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvtrt.eval.texts import load_texts, token_prefix
from kvtrt.runtime import engine as E
from kvtrt.runtime.buffers import bind_decode, graph_outputs
from kvtrt.runtime.kv.store import KVStore
from kvtrt.runtime.prefill import PrefillJob
from kvtrt.runtime.tokenizer import TextCodec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--context", default="512,2048,7680")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", default="1,4")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    engines = {}
    for name, unpack in (("old", False), ("new", True)):
        E.UNPACK_TIED = unpack
        engines[name] = E.OrtEngine(args.dir, threads=args.threads, variants=["prefill_shared", "decode_shared"])
    assert engines["new"]._shared.unpacked and not engines["old"]._shared.unpacked
    m = engines["new"].manifest
    codec = TextCodec(args.dir, m)
    contexts = [int(c) for c in args.context.split(",")]
    ids_all = token_prefix(codec.encode, load_texts(None), max(contexts))
    names = list(engines)
    out = {"args": vars(args), "rows": []}
    for c in contexts:
        ids = ids_all[:c]
        jobs = {n: PrefillJob(engines[n], ids, args.chunk, track_scores=False) for n in names}
        prefill = {n: 0.0 for n in names}
        chunk_ratio = []
        i = 0
        while not jobs["new"].done:
            order = names if i % 2 == 0 else names[::-1]
            took = {}
            for n in order:
                t = time.perf_counter()
                jobs[n].step()
                took[n] = time.perf_counter() - t
                prefill[n] += took[n]
            chunk_ratio.append(took["new"] / took["old"])
            i += 1
        diff = (jobs["new"].logits - jobs["old"].logits).abs().max().item()
        assert jobs["new"].logits.argmax() == jobs["old"].logits.argmax(), "different first token"
        first = int(jobs["new"].logits.argmax())
        row = {"context": c, "prefill_s": prefill, "prefill_chunk_ratio_median": statistics.median(chunk_ratio),
               "logits_max_abs_diff": diff}
        for batch in [int(b) for b in args.batch.split(",")]:
            calls = {}
            for n in names:
                src = jobs[n].store
                store = KVStore(m.n_layers, batch, m.n_kv_heads, m.head_dim, engines[n].dtype, engines[n].arrays,
                                capacity=c + 1)
                for layer in range(m.n_layers):
                    store.keys[layer][:, :, :c] = src.keys[layer][0, :, :c]
                    store.values[layer][:, :, :c] = src.values[layer][0, :, :c]
                store.mask[:, :c + 1] = 1
                ids_t = np.full((batch, 1), first, dtype=np.int64)
                pos = np.full((batch, 1), c, dtype=np.int64)
                slot = np.asarray(c, dtype=np.int64)
                outputs = graph_outputs(engines[n], batch, 1, None, cache=(store.keys, store.values))
                binding = bind_decode(engines[n], "decode_shared", ids_t, pos, store.mask, store.keys, store.values,
                                      outputs, write_slot=slot)
                engines[n].run("decode_shared", binding)  # warm
                calls[n] = (binding, store, outputs, ids_t, pos, slot)
            ms = {n: [] for n in names}
            for step in range(args.steps):
                for n in (names if step % 2 == 0 else names[::-1]):
                    t = time.perf_counter()
                    engines[n].run("decode_shared", calls[n][0])
                    ms[n].append(1000 * (time.perf_counter() - t))
            same = np.array_equal(calls["new"][2]["logits"].argmax(-1), calls["old"][2]["logits"].argmax(-1))
            assert same, "different decode token"
            ratio = statistics.median(b / a for a, b in zip(ms["old"], ms["new"]))
            row[f"decode_b{batch}_ms_median"] = {n: statistics.median(ms[n]) for n in names}
            row[f"decode_b{batch}_ratio"] = ratio
            print(f"ctx {c:5d} batch {batch}: decode ms/step median old {statistics.median(ms['old']):7.2f} "
                  f"new {statistics.median(ms['new']):7.2f} ratio new/old {ratio:.3f}", flush=True)
            del calls
        print(f"ctx {c:5d}: prefill s old {prefill['old']:.2f} new {prefill['new']:.2f} (chunk ratio median "
              f"{row['prefill_chunk_ratio_median']:.3f}); last-token logits max |diff| {diff:.2e}", flush=True)
        out["rows"].append(row)
        del jobs
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
