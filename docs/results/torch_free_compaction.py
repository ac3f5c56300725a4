"""The numpy compaction policies against the torch ones they replaced (commit f5dc110):

    git show f5dc110:kvtrt/runtime/kv/policies.py > /tmp/policies_torch.py
    PYTHONPATH=. python docs/results/torch_free_compaction.py /tmp/policies_torch.py

1. identical picks: 16 specs (every policy, signature, granularity, anchor, block) on 40 random score
   sets of 65-700 slots (uniform, heavily tied, squared normal, log-normal), [Hkv, g, N] and [Hkv, N];
2. time of one 7680-token prompt's choice (30 layers, [3, 3, 7680] float32 scores, keep 1920),
   alternating, median of 7, torch on one thread (the runtime's default `torch_threads`)."""

import dataclasses
import importlib.util
import sys
import time

import numpy as np
import torch

from kvtrt.runtime.kv.spec import parse_kv_spec

torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("kvtrt.runtime.kv.policies_torch", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)


def reference(policy):
    """The torch module's policy with the same options."""
    fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
    if "base" in fields:
        fields["base"] = reference(fields["base"])
    return getattr(old, type(policy).__name__)(**fields)


SPECS = ["snapkv:budget=64", "snapkv:budget=64,kernel=5", "snapkv:budget=64,pool=max", "snapkv:budget=64,block=8",
         "h2o:budget=64", "h2o:budget=64,block=4", "streaming:budget=64", "kvcrush:budget=64",
         "kvcrush:budget=64,pick=first", "kvcrush:budget=64,signature=query",
         "kvcrush:budget=64,granularity=page,signature=block,page=8", "kvcrush:budget=64,granularity=page,page=8",
         "kvcrush:budget=64,base=h2o,anchor=mean", "kvcrush:budget=64,anchor=alternating,ratio=0.5",
         "kvcrush:budget=96,base=streaming,anchor=ones", "kvcrush:budget=64,seed=3"]
rng = np.random.default_rng(0)
same = total = 0
for trial in range(40):
    n, kind = int(rng.integers(65, 700)), trial % 4
    scores = [rng.random((3, 3, n), dtype=np.float32), rng.integers(0, 4, (3, 3, n)).astype(np.float32) / 7,
              (rng.standard_normal((3, 3, n)) ** 2).astype(np.float32) * 1e-3,
              np.exp(rng.standard_normal((3, 3, n)) * 3).astype(np.float32)][kind]
    for text in SPECS:
        policy = parse_kv_spec(text).compaction
        keep = policy.budget_tokens(n)
        for s in (scores,) if "query" in text else (scores, scores.mean(axis=1)):
            total += 1
            same += np.array_equal(policy.select(s, keep), reference(policy).select(torch.from_numpy(s), keep).numpy())
print(f"identical picks: {same}/{total}")

layers = [(rng.standard_normal((3, 3, 7680)) ** 2).astype(np.float32) for _ in range(30)]
print("| spec | torch ms | numpy ms |\n|---|---|---|")
for text in ("snapkv:budget=0.25", "kvcrush:budget=0.25,base=snapkv", "kvcrush:budget=0.25,granularity=page,signature=block"):
    policy = parse_kv_spec(text).compaction
    ref, keep, t_numpy, t_torch = reference(policy), policy.budget_tokens(7680), [], []
    for _ in range(7):
        t = time.perf_counter()
        [policy.select(s, keep) for s in layers]
        t_numpy.append(time.perf_counter() - t)
        t = time.perf_counter()
        [ref.select(torch.from_numpy(s), keep) for s in layers]
        t_torch.append(time.perf_counter() - t)
    print(f"| `{text}` | {1000 * np.median(t_torch):.0f} | {1000 * np.median(t_numpy):.0f} |")
