"""What reusing a compacted conversation costs in accuracy (the scheduler's prefix cache).

A two-turn "conversation" cut from an essay: turn 1 prompts with `first` tokens and "answers" with
the next `answer` tokens (teacher-forced), turn 2 appends `turn` more tokens and the next `scored`
tokens are scored teacher-forced. Three ways to serve turn 2:
- reuse: the cache turn 1 left (compacted by the spec after turn 1's prompt and while decoding),
  the new turn prefilled on top of it and compacted again;
- fresh: the whole conversation prefilled and compacted once (what a server without reuse does);
- full: the full cache (reference).

    python docs/results/multiturn_reuse.py /tmp/smol --kv kvcrush:budget=0.25,base=snapkv --texts 5
"""

from __future__ import annotations

import argparse
import json
import math

from kvtrt import load
from kvtrt.eval.decoding import decode
from kvtrt.eval.texts import load_texts, token_prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--kv", action="append", required=True)
    ap.add_argument("--texts", type=int, default=5)
    ap.add_argument("--first", type=int, default=2048)
    ap.add_argument("--answer", type=int, default=64)
    ap.add_argument("--turn", type=int, default=512)
    ap.add_argument("--scored", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    corpus = load_texts(None)
    rows = []
    for spec in args.kv:
        nll = {"reuse": 0.0, "fresh": 0.0, "full": 0.0}
        reused = tokens = 0
        for i in range(args.texts):
            llm = load(args.dir, kv=spec)  # a fresh prefix cache per text
            n = args.first + args.answer + args.turn + args.scored
            ids = token_prefix(llm.codec.encode, corpus[i:] + corpus[:i], n)
            a, b, c = args.first, args.first + args.answer, args.first + args.answer + args.turn
            decode(llm, ids[:a], args.answer, teacher=ids[a:b], cache=True)  # turn 1, left in the cache
            second = decode(llm, ids[:c], args.scored, teacher=ids[c:], cache=True)
            reused += second.stats.reused_prefix_tokens
            nll["reuse"] -= sum(second.logprobs)
            nll["fresh"] -= sum(decode(llm, ids[:c], args.scored, teacher=ids[c:]).logprobs)
            nll["full"] -= sum(decode(llm, ids[:c], args.scored, "full", teacher=ids[c:]).logprobs)
            tokens += args.scored
            llm.close()
        ppl = {k: math.exp(v / tokens) for k, v in nll.items()}
        rows.append({"kv": spec, **{f"ppl_{k}": v for k, v in ppl.items()}, "reused_tokens_per_text": reused / args.texts,
                     "texts": args.texts, "first": args.first, "answer": args.answer, "turn": args.turn,
                     "scored": args.scored})
    print("| kv | reuse ppl | fresh ppl | full ppl | reuse / fresh | reused tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv']} | {r['ppl_reuse']:.3f} | {r['ppl_fresh']:.3f} | {r['ppl_full']:.3f} | "
              f"{r['ppl_reuse'] / r['ppl_fresh']:.4f} | {r['reused_tokens_per_text']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
