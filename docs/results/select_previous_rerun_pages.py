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
