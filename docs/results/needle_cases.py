"""Passkey cases one by one: what the full cache and each KV spec answer for every (text, depth), from one
prefill per case (`kvtrt eval --task needle`'s prompts, keys and decoding). Shows which cases a spec loses
against the full cache and whether its answers there are near misses (digits off) or something else.

    python docs/results/needle_cases.py /tmp/smol --context 7680 --num-texts 20 \
        --kv quest:budget=1024 --kv freekv:budget=1024,tau=0.8 --json needle_cases.json
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from kvtrt.eval.accuracy import Evaluator
from kvtrt.eval.decoding import decode, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("--context", type=int, default=7680)
    parser.add_argument("--num-texts", type=int, default=10)
    parser.add_argument("--texts", default=None)
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--kv", action="append", default=[], help="KV spec (repeatable), beside the full cache")
    parser.add_argument("--only", default=None, help="TEXT:DEPTH,...: run these cases only (e.g. 8:0.25,16:0.75)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ev = Evaluator(args.dir, args.context, texts=args.texts, num_texts=args.num_texts, progress=False)
    jobs = ev._jobs("needle", None, [float(d) for d in args.depths.split(",")])
    specs = ["full", *args.kv]
    cases = []
    per_text = len(args.depths.split(","))
    only = {(int(t), float(d)) for t, d in (c.split(":") for c in args.only.split(","))} if args.only else None
    for n, (prompt, payload) in enumerate(tqdm(jobs, desc="needle cases")):
        if only is not None and (n // per_text, payload["depth"]) not in only:
            continue
        start = prefill(ev.llm, prompt)
        case = {"text": n // per_text, "depth": payload["depth"], "key": payload["key"], "answers": {}, "hits": {},
                "correction_rates": {}}
        for spec in specs:
            out = decode(ev.llm, prompt, payload["new"], spec, start=start, stop_at_eos=True)
            text = ev.llm.codec.decode(out.tokens)
            case["answers"][spec], case["hits"][spec] = text, payload["key"] in text
            if "correction_rate" in out.stats.kv:
                case["correction_rates"][spec] = out.stats.kv["correction_rate"]
        cases.append(case)
    totals = {spec: sum(c["hits"][spec] for c in cases) for spec in specs}
    print("found:", ", ".join(f"{spec} {hits}/{len(cases)}" for spec, hits in totals.items()))
    rates = {spec: [c["correction_rates"][spec] for c in cases if spec in c["correction_rates"]] for spec in specs}
    print("mean correction rate:", ", ".join(f"{spec} {sum(r) / len(r):.3f}" for spec, r in rates.items() if r))
    for c in cases:
        if len({c["hits"][s] for s in specs}) > 1:
            print(f"text {c['text']} depth {c['depth']} key {c['key']}: " +
                  " | ".join(f"{s}: {'HIT' if c['hits'][s] else 'miss'} {c['answers'][s].strip()[:40]!r}" for s in specs))
    if args.json:
        with open(args.json, "w") as f:
            means = {spec: sum(r) / len(r) for spec, r in rates.items() if r}
            json.dump({"config": vars(args), "totals": totals, "mean_correction_rates": means, "cases": cases}, f,
                      indent=1)


if __name__ == "__main__":
    main()
