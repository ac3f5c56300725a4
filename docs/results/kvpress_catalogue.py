"""Issue 15 item 3's catalogue: which of kvpress's presses scores best on SmolLM2 at a given budget?

kvtrt eval's perplexity protocol (prompt of --context tokens compressed once, 256 teacher-forced tokens
scored after it; same samples as `kvtrt eval --task ppl`), run through kvtrt's kvpress peer
(`kvtrt.eval.peers.KVPressPeer`: each press's own `compress` on the HF model dequantized from the same
GGUF), one press per prefill so that head-masking presses (AdaKV, CriticalAdaKV) keep their masks for
the continuation. The ratio is each press's perplexity over the full cache's on the same samples.

Presses that need a hub download (QFilter, DuoAttention, KVzap, DMS, FastKVzip), a question (Finch), a
decoding-time schedule (CAM, DecodingPress) or their own pipeline pass (KVzip, KVgrad) are not in the list:
the peer runs a press inside one prefill.

    python docs/results/kvpress_catalogue.py /tmp/smol --texts /tmp/tune --num-texts 4 --budget 0.25 \
        --json docs/results/kvpress_catalogue_tune.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from kvtrt.eval.accuracy import Evaluator
from kvtrt.eval.peers import KVPressPeer, kvpress_ratio


def catalogue(ratio: float) -> dict[str, object]:
    """{label: press} at kvpress compression ratio `ratio` (the fraction removed)."""
    import kvpress as kp

    def scorer(cls, **kw):
        return cls(compression_ratio=ratio, **kw)

    presses = {
        "SnapKV(window 32, kernel 5)": scorer(kp.SnapKVPress, window_size=32, kernel_size=5),
        "SnapKV(window 32, kernel 15)": scorer(kp.SnapKVPress, window_size=32, kernel_size=15),
        "PyramidKV": scorer(kp.PyramidKVPress, window_size=32, kernel_size=5),
        "StreamingLLM(sink 4)": scorer(kp.StreamingLLMPress, n_sink=4),
        "ObservedAttention (H2O)": scorer(kp.ObservedAttentionPress),
        "ExpectedAttention": scorer(kp.ExpectedAttentionPress),
        "TOVA": scorer(kp.TOVAPress),
        "KeyDiff": scorer(kp.KeyDiffPress),
        "Knorm": scorer(kp.KnormPress),
        "LagKV": scorer(kp.LagKVPress),
        "LeverageScore": scorer(kp.LeverageScorePress),
        "CUR": scorer(kp.CURPress),
        "Compactor": scorer(kp.CompactorPress),
        "CapPress": scorer(kp.CapPress),
        "Random": scorer(kp.RandomPress),
        "CriticalKV(SnapKV k5)": kp.CriticalKVPress(press=scorer(kp.SnapKVPress, window_size=32, kernel_size=5)),
        "CriticalKV(ExpectedAttention)": kp.CriticalKVPress(press=scorer(kp.ExpectedAttentionPress, use_vnorm=False)),
        "AdaKV(SnapKV k5)": kp.AdaKVPress(press=scorer(kp.SnapKVPress, window_size=32, kernel_size=5)),
        "AdaKV(ExpectedAttention)": kp.AdaKVPress(press=scorer(kp.ExpectedAttentionPress)),
        "CriticalAdaKV(ExpectedAttention)": kp.CriticalAdaKVPress(press=scorer(kp.ExpectedAttentionPress, use_vnorm=False)),
        "ChunkKV(SnapKV k5, 20)": kp.ChunkKVPress(press=scorer(kp.SnapKVPress, window_size=32, kernel_size=5)),
        "BlockPress(ExpectedAttention)": kp.BlockPress(press=scorer(kp.ExpectedAttentionPress)),
    }
    return presses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="kvtrt export folder (its tokenizer and source give the samples and the HF model)")
    ap.add_argument("--texts", default=None, help="folder of .txt texts (default: the haystack essays)")
    ap.add_argument("--num-texts", type=int, default=4, help="samples, one per text")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt kept")
    ap.add_argument("--only", default=None, help="semicolon-separated labels (as in the table): run only these")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ev = Evaluator(args.dir, args.context, texts=args.texts, num_texts=args.num_texts, progress=False)
    peer = KVPressPeer(ev.llm.manifest.source, threads=2)
    ratio = kvpress_ratio(int(args.budget * args.context), args.context)
    presses = catalogue(ratio)
    if args.only:
        wanted = [w.strip() for w in args.only.split(";")]
        unknown = [w for w in wanted if w not in presses]
        if unknown:
            raise SystemExit(f"--only: unknown label(s) {unknown}; the labels are {list(presses)}")
        presses = {k: v for k, v in presses.items() if k in wanted}
    nll = {"full": 0.0, **{k: 0.0 for k in presses}}
    errors: dict[str, str] = {}
    seconds = {k: 0.0 for k in presses}
    tokens = 0
    for i, (prompt, targets) in enumerate(ev._jobs("ppl", None, None)):
        nll["full"] += peer.run(prompt, {}, targets=targets)["full"]
        for label, press in presses.items():
            if label in errors:
                continue
            t = time.perf_counter()
            try:
                nll[label] += peer.run(prompt, {label: press}, targets=targets)[label]
            except Exception as e:  # a press this peer cannot run: say which and why
                errors[label] = f"{type(e).__name__}: {e}"[:200]
            seconds[label] += time.perf_counter() - t
        tokens += len(targets)
        print(f"sample {i + 1}: full {math.exp(nll['full'] / tokens):.3f}", flush=True)
    full = math.exp(nll["full"] / tokens)
    rows = []
    for label in presses:
        if label in errors:
            rows.append({"press": label, "error": errors[label]})
            continue
        ppl = math.exp(nll[label] / tokens)
        rows.append({"press": label, "ppl": ppl, "ratio": ppl / full, "seconds_per_sample": seconds[label] / args.num_texts})
    print(f"| press (kvpress, budget {args.budget:g}) | ratio to full | s per sample |\n|---|---|---|")
    for r in sorted(rows, key=lambda r: r.get("ratio", math.inf)):
        print(f"| {r['press']} | {r['ratio']:.4f} | {r['seconds_per_sample']:.1f} |" if "ratio" in r
              else f"| {r['press']} | error: {r['error']} | |")
    print(f"(full cache perplexity {full:.3f}; {args.num_texts} samples x {tokens // args.num_texts} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "kvpress_ratio": ratio, "full_ppl": full, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
