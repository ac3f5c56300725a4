"""`kvtrt bench`: prefill time, decode speed, peak RSS and KV memory per context, each measurement in
its own subprocess, optionally beside peers on the same model and the same token ids: onnxruntime-genai,
and OpenVINO GenAI's LLMPipeline with its CPU default u8 KV cache and with f32 KV."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..contract import DEFAULT_PREFILL_CHUNK
from .peers import (OPENVINO_BLOCK, PEERS, build_openvino, build_ortgenai, openvino_directory,
                    openvino_kv_bytes_per_token, ortgenai_model, peer_directory)
from .texts import load_texts, token_prefix


def measure_kvtrt(directory: str, ids: list[int], new_tokens: int, kv: str, threads: int, prefill_chunk: int) -> dict:
    """Runs in the worker process: one greedy generation of exactly `new_tokens` tokens."""
    from ..runtime.llm import load

    llm = load(directory, kv=kv, threads=threads, prefill_chunk=prefill_chunk, prefix_cache=0)
    warm_kv = llm.kv
    if warm_kv.retrieval is not None and warm_kv.retrieval.engages(len(ids)):
        # engage retrieval on the short warm-up prompt too, as it will on the measured one: the same
        # graphs warm (only then: its views would otherwise count in the peak RSS of a dense run)
        warm_kv = replace(warm_kv, retrieval=replace(warm_kv.retrieval, min_context=0))
    if warm_kv.compaction is not None and isinstance(warm_kv.compaction.budget, float):
        # a fraction of the 16 warm-up tokens cannot hold sink + window: keep them all (the same graphs run)
        policy = warm_kv.compaction
        warm_kv = replace(warm_kv, compaction=replace(policy, budget=policy.sink + policy.window + 16))
    llm.generate(ids[:16], max_new_tokens=4, temperature=0.0, ignore_eos=True, kv=warm_kv)
    s = llm.generate(ids, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True).stats
    attention = getattr(llm.engine, "decode_attention", None)  # which decode attention ran ("kvtrt" kernel or ORT's)
    llm.close()
    # prefill_s: the prompt's whole cost (with a FreeKV pool's build); ttft_s: submit -> first token
    return {"prefill_s": s.prefill_s, "ttft_s": s.ttft_s, "decode_tok_s": s.decode_tok_s, "kv_mib": s.kv_bytes / 2**20,
            "new_tokens": s.new_tokens, "kv_stats": s.kv, "decode_attention": attention}


def measure_ortgenai(model_dir: str, ids: list[int], new_tokens: int, threads: int) -> dict:
    """Runs in the worker process: the same greedy generation with onnxruntime-genai."""
    import onnxruntime_genai as og

    model = ortgenai_model(model_dir, threads)
    total = len(ids) + new_tokens

    def run(prompt: list[int], n: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)  # prefill
        t1 = time.perf_counter()
        steps = 0
        while not generator.is_done() and steps < n - 1:
            generator.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        return t1 - t0, steps / (t2 - t1) if t2 > t1 else 0.0

    run(ids[:16], 4)
    prefill_s, tok_s = run(ids, new_tokens)
    info = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
    layers = info["decoder"]["num_hidden_layers"]
    kv_heads, head = info["decoder"]["num_key_value_heads"], info["decoder"]["head_size"]
    kv_mib = 2 * layers * kv_heads * head * total * 4 / 2**20  # fp32 KV on CPU (also for int4 weights)
    return {"prefill_s": prefill_s, "decode_tok_s": tok_s, "kv_mib": kv_mib, "new_tokens": new_tokens, "kv_stats": {}}


#: the OpenVINO rows: its CPU default KV precision (u8) and f32 KV
OPENVINO_CONFIGS = {"full-u8": None, "full-f32": "f32"}


def measure_openvino(model_dir: str, ids: list[int], new_tokens: int, threads: int, kv: str,
                     kv_dims: tuple[int, int, int]) -> dict:
    """Runs in the worker process: the same greedy generation with OpenVINO GenAI's LLMPipeline, fp32
    compute, `threads` INFERENCE_NUM_THREADS, KV per `kv` (full-u8: its CPU default; full-f32); the
    prefill time is its TTFT, the decode speed 1 / its TPOT (its own perf_metrics). `kv_dims`: layers,
    KV heads, head size, for the KV estimate (whole 32-token blocks)."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    from .concurrency import openvino_generation_config

    if kv not in OPENVINO_CONFIGS:
        raise ValueError(f"OpenVINO bench config {kv!r} is unknown; use one of {', '.join(OPENVINO_CONFIGS)}")
    properties = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    if OPENVINO_CONFIGS[kv]:
        properties["KV_CACHE_PRECISION"] = OPENVINO_CONFIGS[kv]
    pipe = ov_genai.LLMPipeline(str(model_dir), "CPU", **properties)

    def run(prompt: list[int], n: int) -> tuple[float, float, int]:
        out = pipe.generate(ov.Tensor(np.array([prompt], dtype=np.int64)), openvino_generation_config(n))
        metrics = out.perf_metrics
        tpot_ms = metrics.get_tpot().mean
        return metrics.get_ttft().mean / 1000, 1000 / tpot_ms if tpot_ms > 0 else 0.0, len(out.tokens[0])

    run(ids[:16], 4)
    prefill_s, tok_s, generated = run(ids, new_tokens)
    blocks = -(-(len(ids) + new_tokens) // OPENVINO_BLOCK)
    per_token = openvino_kv_bytes_per_token(*kv_dims, OPENVINO_CONFIGS[kv] or "u8")
    return {"prefill_s": prefill_s, "decode_tok_s": tok_s, "kv_mib": blocks * OPENVINO_BLOCK * per_token / 2**20,
            "new_tokens": generated, "kv_stats": {}, "kv_precision": OPENVINO_CONFIGS[kv] or "u8",
            "kv_estimated": True}


def _worker(args: dict) -> None:
    ids = json.loads(Path(args["ids_file"]).read_text())
    if args["engine"] == "kvtrt":
        row = measure_kvtrt(args["dir"], ids, args["new_tokens"], args["kv"], args["threads"], args["prefill_chunk"])
    elif args["engine"] == "openvino":
        row = measure_openvino(args["openvino_dir"], ids, args["new_tokens"], args["threads"], args["kv"],
                               args["kv_dims"])
    else:
        row = measure_ortgenai(args["peer_dir"], ids, args["new_tokens"], args["threads"])
    row["peak_rss_mib"] = peak_rss_mib()
    print("KVTRT_BENCH_ROW " + json.dumps(row))


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB. Linux: VmHWM, the high-water mark of this
    program's own address space. (`ru_maxrss` is not used there: it keeps the parent's size at
    fork, so a worker spawned by a bench that had just built the peer reported the parent's 1.2 GB.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(args: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]))
    proc = subprocess.run([sys.executable, "-m", "kvtrt.eval.bench", json.dumps(args)], capture_output=True,
                          text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("KVTRT_BENCH_ROW "):
            return json.loads(line[len("KVTRT_BENCH_ROW "):])
    raise RuntimeError(f"bench worker failed ({args['engine']}, context {args['context']}):\n{proc.stderr[-3000:]}")


def run_bench(directory: str, contexts: list[int], kv_specs: list[str], new_tokens: int = 64, threads: int = 2,
              peer: str | list[str] | None = None, peer_dir: str | None = None, texts: str | None = None,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK, repeat: int = 2, peer_precision: str = "fp32",
              openvino_dir: str | None = None) -> list[dict]:
    """Measure every (context, kv spec) and the peers (`peer`: 'ortgenai', 'openvino' or a list of them;
    `peer_dir` is onnxruntime-genai's model, `openvino_dir` OpenVINO's, both built once when missing);
    returns the rows (also printed as a table)."""
    from ..manifest import Manifest
    from ..runtime.tokenizer import TextCodec

    manifest = Manifest.load(directory)
    for c in contexts:
        if c + new_tokens > manifest.max_positions:
            raise ValueError(f"context {c} + {new_tokens} new tokens exceeds the export's {manifest.max_positions} "
                             f"positions; lower --context or --new-tokens")
    codec = TextCodec(directory, manifest)
    corpus = load_texts(texts)
    peers = list(dict.fromkeys([peer] if isinstance(peer, str) else peer or []))
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"--peer {', '.join(map(repr, unknown))} is unknown; the peers are {', '.join(PEERS)}")
    peer_jobs = []
    if "ortgenai" in peers:
        peer_dir = peer_directory(directory, peer_dir, peer_precision)
        build_ortgenai(directory, Path(peer_dir), peer_precision)
        peer_jobs.append(("ortgenai", "full"))
    if "openvino" in peers:
        openvino_dir = str(build_openvino(directory, Path(openvino_directory(directory, openvino_dir))))
        peer_jobs += [("openvino", kv) for kv in OPENVINO_CONFIGS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for context in contexts:
            ids_file = Path(tmp) / f"ids-{context}.json"
            ids_file.write_text(json.dumps(token_prefix(codec.encode, corpus, context)))
            jobs = [("kvtrt", kv) for kv in kv_specs] + peer_jobs
            best: dict[tuple[str, str], dict] = {}
            for _ in range(repeat):  # interleaved, so a noisy phase of the host hits every engine alike
                for engine, kv in jobs:
                    args = {"engine": engine, "dir": str(directory), "peer_dir": peer_dir, "ids_file": str(ids_file),
                            "new_tokens": new_tokens, "kv": kv, "threads": threads, "prefill_chunk": prefill_chunk,
                            "context": context, "openvino_dir": openvino_dir,
                            "kv_dims": [manifest.n_layers, manifest.n_kv_heads, manifest.head_dim]}
                    row = {"context": context, "engine": engine, "kv": kv, **_spawn(args)}
                    row.setdefault("ttft_s", row["prefill_s"])  # a peer's prefill ends with its first token
                    print(_format_row(row), file=sys.stderr, flush=True)
                    old = best.get((engine, kv))
                    if old is None:
                        best[(engine, kv)] = row
                    else:  # best of the runs, each metric on its own
                        old["decode_tok_s"] = max(old["decode_tok_s"], row["decode_tok_s"])
                        old["prefill_s"] = min(old["prefill_s"], row["prefill_s"])
                        old["ttft_s"] = min(old["ttft_s"], row["ttft_s"])
                        old["peak_rss_mib"] = min(old["peak_rss_mib"], row["peak_rss_mib"])
            rows += best.values()
    return rows


def _format_row(row: dict) -> str:
    return (f"  context {row['context']:>6} | {row['engine']:<8} | {row['kv']:<40} | prefill {row['prefill_s']:7.2f} s"
            f" | decode {row['decode_tok_s']:6.1f} tok/s | peak RSS {row['peak_rss_mib']:7.0f} MiB"
            f" | KV {row['kv_mib']:7.1f} MiB")


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, with a decode-speed ratio to each peer row of the same context (one
    column per peer config: ortgenai, openvino full-u8, openvino full-f32) and kvtrt's to its full cache.
    A peer's KV MiB marked * is an estimate."""
    peers = list(dict.fromkeys((r["engine"], r["kv"]) for r in rows if r["engine"] != "kvtrt"))
    names = [engine if kv == "full" else f"{engine} {kv}" for engine, kv in peers]
    lines = ["| context | engine | kv | prefill s | TTFT s | decode tok/s | peak RSS MiB | KV MiB | "
             + "".join(f"decode vs {name} | " for name in names) + "decode vs full |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(peers) + "---|"]
    for row in rows:
        same = [r for r in rows if r["context"] == row["context"]]
        full = next((r for r in same if r["engine"] == "kvtrt" and r["kv"] == "full"), None)
        vs_peers = ""
        for engine, kv in peers:
            peer = next((r for r in same if r["engine"] == engine and r["kv"] == kv), None)
            vs_peers += f"{row['decode_tok_s'] / peer['decode_tok_s']:.2f}x | " \
                if peer and row is not peer and peer["decode_tok_s"] else " | "
        vs_full = f"{row['decode_tok_s'] / full['decode_tok_s']:.2f}x" if full and row["engine"] == "kvtrt" else ""
        kv_mib = f"{row['kv_mib']:.1f}" + ("*" if row.get("kv_estimated") else "")
        lines.append(f"| {row['context']} | {row['engine']} | {row['kv']} | {row['prefill_s']:.2f} | "
                     f"{row.get('ttft_s', row['prefill_s']):.2f} | "
                     f"{row['decode_tok_s']:.1f} | {row['peak_rss_mib']:.0f} | {kv_mib} | {vs_peers}{vs_full} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
