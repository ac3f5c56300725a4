"""Decode throughput while C requests all decode: C haystack prompts of 3000 tokens submitted at once, greedy, N
new tokens each; the window runs from the last request's first token to the first request's last one (every
row decoding in it), tokens counted in it. Run it alternately for two code versions (PYTHONPATH=worktree) to
compare C=1 and C=8 side by side. Results: `decode_attention.md`.

    python docs/results/all_rows_speed.py /tmp/smol16 8 160
"""

import glob
import os
import sys

import kvtrt

directory, c, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 160
llm = kvtrt.load(directory, threads=2)
texts = sorted(glob.glob(os.path.join(os.environ.get("KVTRT_TEXTS", "../shared/data/haystack"), "*.txt")))
ids = llm.encode(" ".join(open(t).read() for t in texts[:20]), chat=False)
llm.generate(ids[:200], max_new_tokens=4)  # warm-up
results = [r.result() for r in [llm.submit(ids[i * 3100: i * 3100 + 3000], max_new_tokens=new, temperature=0)
                                for i in range(c)]]
lo = max(r.stats.token_times[0] for r in results)
hi = min(r.stats.token_times[-1] for r in results)
n = sum(sum(1 for t in r.stats.token_times if lo < t <= hi) for r in results)
print(f"C={c}: all {c} decoding for {hi - lo:.2f} s, {n} tokens: {n / (hi - lo):.1f} tok/s, "
      f"{1000 * (hi - lo) / (n / c):.1f} ms a step")
