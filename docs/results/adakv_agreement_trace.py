"""First position where snapkv and adakv (25%) leave the full cache's greedy tokens, per agreement prompt
(`adakv.md`, "Agreement"): python docs/results/adakv_agreement_trace.py (export /tmp/smol7, texts /tmp/report)."""
import numpy as np

from kvtrt.eval.accuracy import Evaluator
from kvtrt.eval.decoding import decode, prefill
ev = Evaluator("/tmp/smol7", 4096, texts="/tmp/report", num_texts=4, progress=False)
llm = ev.llm
for job in ev._jobs("agreement", None, None):
    prompt = job[0]
    start = prefill(llm, prompt)
    full = decode(llm, prompt, 64, "full", start=start, keep_logits=True)
    row = []
    for spec in ("snapkv:budget=0.25", "adakv:budget=0.25"):
        got = decode(llm, prompt, 64, spec, start=start)
        first = next((i for i, (a, b) in enumerate(zip(got.tokens, full.tokens)) if a != b), 64)
        if first < 64:
            lg = full.logits[first]
            lp = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
            margin = float(lp[full.tokens[first]] - lp[got.tokens[first]])
        else:
            margin = None
        row.append((spec, first, sum(a == b for a, b in zip(got.tokens, full.tokens)), margin))
    print(row, flush=True)
