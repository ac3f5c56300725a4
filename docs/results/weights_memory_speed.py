"""Step-interleaved speed, one process: an engine with shared prepacked weights (new) and one with a
Python session per graph (old, `engine.SHARE_WEIGHTS = False`), generations of the same prompt
advanced alternately token by token (order flipped every step and round); tokens asserted equal.
usage: KVTRT_TEXTS=../shared/data/haystack python docs/results/weights_memory_speed.py DIR 512,2048 ROUNDS NEW_TOKENS

Runs against the runtime it measured (commit 24f517d): it drives `kvtrt.runtime.generator.Generation`
step by step, which b138463 replaced by the scheduler (whose thread decodes on its own, so steps of two
engines can no longer be interleaved from outside). To rerun: `git worktree add /tmp/w 24f517d` and
`PYTHONPATH=/tmp/w python /tmp/w/docs/results/weights_memory_speed.py ...`."""
import json, os, statistics, sys, time
import kvtrt
from kvtrt.runtime import engine as E
from kvtrt.eval.texts import load_texts, token_prefix
from kvtrt.runtime.generator import Generation
from kvtrt.runtime.sampling import SamplingParams

directory, contexts, rounds, new = sys.argv[1], [int(c) for c in sys.argv[2].split(',')], int(sys.argv[3]), int(sys.argv[4])
llms = {}
for name, share in (("old", False), ("new", True)):
    E.SHARE_WEIGHTS = share
    t = time.perf_counter(); llms[name] = kvtrt.load(directory, threads=2); print(name, "load_s", round(time.perf_counter() - t, 2), flush=True)
modes = list(llms)
ids_all = token_prefix(llms["new"].codec.encode, load_texts(None), max(contexts))
def gen(llm, ids, n):
    return Generation(llm.engine, [ids], n, SamplingParams(), [], 512, kv=llm.kv)
for m in modes:
    for _ in gen(llms[m], ids_all[:16], 4).run():
        pass
res = {}
for c in contexts:
    ids = ids_all[:c]
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        its = {m: gen(llms[m], ids, new + 1).run() for m in order}
        toks = {m: [] for m in order}
        for m in order:
            t = time.perf_counter(); toks[m].append(next(its[m])); res.setdefault(f"{c}:{m}:prefill", []).append(time.perf_counter() - t)
        for step in range(new):
            for m in (order if step % 2 == 0 else order[::-1]):
                t = time.perf_counter(); toks[m].append(next(its[m])); res.setdefault(f"{c}:{m}:step", []).append(1000 * (time.perf_counter() - t))
        assert str(toks["old"]) == str(toks["new"]), "different tokens"
        del its
    for m in modes:
        pf = res[f"{c}:{m}:prefill"]; dm = res[f"{c}:{m}:step"]
        print(f"ctx {c:5d} {m:4s} prefill best {min(pf):7.3f} med {statistics.median(pf):7.3f} s | decode best {min(dm):7.2f} med {statistics.median(dm):7.2f} ms/step (n={len(dm)})", flush=True)
    ratio = [b / a for a, b in zip(res[f"{c}:old:step"], res[f"{c}:new:step"])]
    print(f"ctx {c:5d} new/old per adjacent step pair: median {statistics.median(ratio):.3f}", flush=True)
print("JSON " + json.dumps(res))
