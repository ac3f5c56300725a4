"""Prototype (not in the runtime): `rerun` with a page criterion instead of the cosine one.

A step runs again when some KV head's `m` best pages for the step's own query are not all in the view
(`m` = round(10 * rerun): rerun=0.1 -> the best page, 0.2 -> the best two, 0.4 -> the best four),
patched over `FreeKVRetrieval.moved`; passkeys at 4096 tokens, 30 cases, as `kvtrt eval --task needle`.
Output: `select_previous_rerun_pages_needle4096.json`. Usage: python select_previous_rerun_pages.py
"""
import json, numpy as np, kvtrt
from kvtrt.eval.accuracy import Evaluator, expand_specs, table
from kvtrt.runtime.kv.freekv import FreeKVRetrieval
def moved(self, query, threshold):
    m = int(round(threshold * 10))
    view = self.view()
    top = self.pool.select(None, np.asarray(query), m, self.combine, n_pages=view.n_pages)  # [L,B,Hkv,m]
    held = (view.slot_pages[..., None, :] == top[..., :, None]).any(-1) | (top < 0)   # [L,B,Hkv,m]
    return bool((~held).any())
FreeKVRetrieval.moved = moved
ev = Evaluator("/tmp/smol", 4096, num_texts=10, threads=2, progress=False)
rows = ev.run("needle", expand_specs(["freekv:budget=1024,select=previous,rerun=0.1", "freekv:budget=1024,select=previous,rerun=0.2",
                                      "freekv:budget=1024,select=previous,rerun=0.4"], []), depths=[0.25,0.5,0.75])
print(table(rows))
json.dump(rows, open("/tmp/s11_missneedle.json","w"), indent=1)
