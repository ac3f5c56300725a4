"""kvtrt's side of `eval_budget.json` without re-compaction while decoding, as kvpress does it.

kvtrt re-compacts a decoding sequence to its budget whenever it outgrows it by COMPACTION_SLACK (64)
tokens; kvpress compresses the prefill only and lets the cache grow by every decoded token. Raising the
slack past the 256 scored tokens turns kvtrt's re-compaction off, so the remaining gap to kvpress is
the selection and the numerics alone. Usage: python docs/results/eval_budget_noslack.py /tmp/smol 4 OUT.json
"""

import json
import sys

import kvtrt.runtime.batch as batch
from kvtrt.eval.accuracy import Evaluator, expand_specs, table

batch.COMPACTION_SLACK = 300  # > 256 scored tokens: never re-compacted while decoding

directory, texts, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
evaluator = Evaluator(directory, 4096, num_texts=texts, threads=2)
rows = evaluator.run("ppl", expand_specs(["snapkv", "h2o", "streaming"], [0.1, 0.25]), new_tokens=256)
print(table(rows))
with open(out, "w") as f:
    json.dump(rows, f, indent=2)
