"""Greedy tokens of FreeKV / Quest specs after a 4096-token prompt (from /tmp/ids7680.json, the haystack
prefix kvtrt bench builds), written to argv[1]: run on two versions of kvtrt and compare the files."""
import json, sys, kvtrt
ids = json.load(open("/tmp/ids7680.json"))[:4096]
llm = kvtrt.load("/tmp/smol", threads=2)
out = {}
for spec in ("freekv:budget=1024", "quest:budget=1024", "freekv:budget=1024,pool_dtype=int8"):
    r = llm.generate(ids, max_new_tokens=48, temperature=0.0, ignore_eos=True, kv=spec)
    out[spec] = r.token_ids
    print(spec, r.stats.kv.get("retrieval_engaged"), r.stats.kv.get("heads_corrected"), file=sys.stderr)
json.dump(out, open(sys.argv[1], "w"))  # compare two such files: the same token ids
