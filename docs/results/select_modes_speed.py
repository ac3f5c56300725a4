"""Decode speed of KV specs side by side in one process: one prefill, every spec decodes from a copy of it.

One prefill of a haystack prompt of `--context` tokens (and, with `--flat-context N`, one of N tokens
decoded with the full cache: issue 16's "flat in context" reference); then each spec decodes
`--new-tokens` greedy tokens from a copy, the specs interleaved, `--repeat` rounds; the median per spec.

    python docs/results/select_modes_speed.py /tmp/smol --context 7680 --flat-context 512 \
        --kv full --kv freekv:budget=1024 --kv freekv:budget=1024,select=previous --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics

import kvtrt
from kvtrt.eval.decoding import decode, prefill
from kvtrt.eval.texts import load_texts, token_prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--context", type=int, default=7680)
    ap.add_argument("--flat-context", type=int, default=None, help="also decode the full cache at this context")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv", action="append", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    llm = kvtrt.load(args.dir, threads=args.threads)
    texts = load_texts()
    jobs = [(f"{spec} @ {args.context}", spec) for spec in args.kv]
    ids = {args.context: token_prefix(llm.codec.encode, texts, args.context)}
    if args.flat_context:
        ids[args.flat_context] = token_prefix(llm.codec.encode, texts, args.flat_context)
        jobs.append((f"full @ {args.flat_context}", "full"))
    starts = {n: prefill(llm, prompt) for n, prompt in ids.items()}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for label, spec in jobs:
            n = args.flat_context if label.endswith(f"@ {args.flat_context}") and args.flat_context else args.context
            got = decode(llm, ids[n], args.new_tokens, spec, start=starts[n])
            kv = got.stats.kv
            runs.setdefault(label, []).append(
                {"tok_s": got.stats.decode_tok_s, "correction_rate": kv.get("correction_rate"),
                 "pages_recalled_per_step": kv.get("pages_recalled_per_step"), "kv_bytes": got.stats.kv_bytes,
                 "correction_ms_per_step": 1e3 * kv["correction_s"] / kv["steps"] if kv.get("steps") else None})
    reference = statistics.median(r["tok_s"] for r in runs[jobs[-1][0]]) if args.flat_context else None
    print(f"| spec | decode tok/s (median of {args.repeat}) | all runs | correction rate | pages recalled / step "
          f"| correction ms / step | KV MiB |" + (f" vs full @ {args.flat_context} |" if reference else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if reference else ""))
    rows = []
    for label, got in runs.items():
        med = {k: statistics.median(r[k] for r in got) if got[0][k] is not None else None for k in got[0]}
        rows.append({"spec": label, **med, "runs": got})
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {label} | {med['tok_s']:.1f} | {', '.join(format(r['tok_s'], '.1f') for r in got)} | "
              f"{fmt(med['correction_rate'], '.2f')} | {fmt(med['pages_recalled_per_step'], '.0f')} | "
              f"{fmt(med['correction_ms_per_step'], '.2f')} | "
              f"{med['kv_bytes'] / 2**20:.0f} |" + (f" {med['tok_s'] / reference:.2f}x |" if reference else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dir": args.dir, "context": args.context, "flat_context": args.flat_context,
                       "new_tokens": args.new_tokens, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
