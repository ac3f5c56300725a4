"""Decode speed of FreeKV/Quest with and without decode groups, side by side in one process.

One export made with `kvtrt export --decode-groups N`; one prefill of a haystack prompt, then each
(spec, mode) decodes from a copy of it, interleaved, `--repeat` times (median reported). Mode
`groups`: the row runs the lookahead graph and the N group graphs, refreshing each range's pages with
its lookahead query (spec option `select=fresh`); `inline`: the one decode_shared graph, each layer's
pages re-selected inside kvtrt's decode attention op with its own query (`select=inline`, the CPU
default since the twelfth session; any export); `previous` / `speculative`: the one decode_shared graph
with pages chosen by the previous step's query (`select=previous`, or `select=speculative`, the double
buffer). `--page-ops both`
runs each measurement with FreeKV's C page selection and recall (`cpu_kernels/page_ops.c`) and with the
numpy / ONNX Runtime code they replaced (`KVTRT_PAGE_OPS=0`), interleaved.

    python docs/results/decode_groups_speed.py /tmp/smol-g30 --context 4096 --new-tokens 128 \
        --kv freekv:budget=1024 --kv quest:budget=1024 --kv full --repeat 3 --modes groups,previous
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import kvtrt
from kvtrt.eval.decoding import decode, prefill
from kvtrt.eval.texts import load_texts, token_prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv", action="append", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="groups,speculative", help="comma-separated: groups, inline, previous, speculative")
    ap.add_argument("--page-ops", choices=("on", "off", "both"), default="on")
    ap.add_argument("--json")
    args = ap.parse_args()
    page_ops = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.page_ops]

    llm = kvtrt.load(args.dir, threads=args.threads)
    ids = token_prefix(llm.codec.encode, load_texts(), args.context)
    start = prefill(llm, ids)
    runs: dict[tuple[str, str], list[dict]] = {}
    modes = args.modes.split(",")
    for _ in range(args.repeat):
        for spec in args.kv:
            for mode, ops in ((m, o) for m in modes for o in page_ops):
                if spec == "full" and (mode != modes[0] or ops != page_ops[0]):  # once per repeat
                    continue
                select = "" if spec == "full" else (",select=" + ("fresh" if mode == "groups" else mode))
                os.environ["KVTRT_PAGE_OPS"] = "1" if ops == "on" else "0"
                got = decode(llm, ids, args.new_tokens, spec + select, start=start)
                kv = got.stats.kv
                runs.setdefault((spec, mode if len(page_ops) == 1 else f"{mode}, page ops {ops}"), []).append(
                    {"tok_s": got.stats.decode_tok_s, "correction_rate": kv.get("correction_rate"),
                     "pages_recalled_per_step": kv.get("pages_recalled_per_step"),
                     "correction_ms_per_step": 1e3 * kv.get("correction_s", 0) / max(1, kv.get("steps", 1))})
    rows = []
    print(f"| spec | mode | decode tok/s (median of {args.repeat}) | correction rate | pages recalled / step "
          f"| correction ms / step |")
    print("|---|---|---|---|---|---|")
    for (spec, mode), got in runs.items():
        med = {k: statistics.median(r[k] for r in got) if got[0][k] is not None else None for k in got[0]}
        rows.append({"spec": spec, "mode": mode, **med, "runs": got})
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {spec} | {mode} | {med['tok_s']:.1f} | {fmt(med['correction_rate'], '.2f')} | "
              f"{fmt(med['pages_recalled_per_step'], '.0f')} | {fmt(med['correction_ms_per_step'], '.2f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dir": args.dir, "context": args.context, "new_tokens": args.new_tokens,
                       "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
