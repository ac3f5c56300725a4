"""Trace the needle's pages through FreeKV's selection, correction and recall (issue 16, item 1).

For each needle prompt (``kvtrt eval``'s passkey task: same texts, depths and keys), one prefill,
then greedy decoding with several retrieval variants driven step by step as the runtime drives
them (``kvtrt/runtime/retrieval_batch.py`` ``_RetrievalRow``). At every step it records, per variant, the
share of (layer, KV head) whose *attended view* holds a page of the needle, and the share whose
*fresh selection with the step's own query* would hold one (the query the step really computed,
known only after the step: what an in-model correction like FreeKV's would use). It also records
the drift test on queries after RoPE (what the runtime tests) and before RoPE (queries un-rotated
with the model's frequencies), per KV group (mean cosine over the group's query heads, the
runtime's test) and per query head (any head of the group below tau).

    python docs/results/freekv_needle_trace.py /tmp/smol --context 4096 --texts 10 --json out.json

Prints a table per variant: needle accuracy, view coverage of the needle at the answer steps,
fresh-selection coverage at the same steps, correction rates of each drift test.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from kvtrt.eval.accuracy import Evaluator
from kvtrt.runtime.retrieval_batch import RetrievalGroup, _RetrievalRow
from kvtrt.runtime.kv.spec import parse_kv_spec
from kvtrt.runtime.prefill import PrefillJob
from kvtrt.runtime.request import RequestStats


def unrotate(query: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Queries ``[L, 1, H, D]`` rotated at ``position`` back to before RoPE (rotate_half convention)."""
    freqs = position * inv_freq  # [D/2]
    emb = torch.cat((freqs, freqs))
    cos, sin = emb.cos(), emb.sin()
    half = query.shape[-1] // 2
    rot = torch.cat((-query[..., half:], query[..., :half]), dim=-1)
    return query * cos - rot * sin


def drift(q: torch.Tensor, prev: torch.Tensor, hkv: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([L,B,Hkv] group-mean test, [L,B,Hkv] any-head test) for queries ``[L,B,H,D]``."""
    cos = torch.nn.functional.cosine_similarity(q.float(), prev.float(), dim=-1, eps=1e-8)
    g = cos.reshape(*cos.shape[:-1], hkv, -1)
    return g.mean(-1) < tau, (g < tau).any(-1)


class Driver:
    """One sequence decoded by the runtime's own retrieval row (``kvtrt/runtime/retrieval_batch.py``), with what
    each step attended and the query it computed exposed."""

    def __init__(self, llm, spec: str, store, query, position: int, first: int, remaining: int):
        seq = SimpleNamespace(retrieval=parse_kv_spec(spec).retrieval, remaining=remaining, pending=first,
                              position=position, stats=RequestStats())
        self.row = _RetrievalRow(RetrievalGroup(llm.engine), seq, store, query)
        self.r = self.row.manager

    @property
    def position(self) -> int:
        return self.row.seq.position

    def step(self):
        """One decode step; returns (next token, view slot_pages attended [L,1,Hkv,k], query [L,1,H,D])."""
        view = self.r.view()
        logits = self.row.step()
        # what the step attended (the next prefetch writes it later), as torch tensors for the analysis
        attended = torch.as_tensor(view.slot_pages).clone()
        query = torch.stack([torch.as_tensor(q).clone() for q in self.row.bound[view.index][2]])
        seq = self.row.seq
        seq.pending, seq.position = int(logits.argmax()), seq.position + 1
        return seq.pending, attended, query


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--texts", type=int, default=10)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--rope-theta", type=float, default=100000.0, help="the model's rope_theta (SmolLM2: 100000)")
    ap.add_argument("--variants", default="quest,freekv:tau=0.9,freekv:tau=1,freekv:tau=0")
    ap.add_argument("--json")
    args = ap.parse_args()

    ev = Evaluator(args.export, args.context, num_texts=args.texts, progress=False)
    llm, m = ev.llm, ev.llm.manifest
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, m.head_dim, 2).float() / m.head_dim))
    variants = [v.split(":") for v in args.variants.split(",")]
    specs = {":".join(v): (f"{v[0]}:budget={args.budget}" + (f",{v[1]}" if len(v) > 1 else "")) for v in variants}
    jobs = [(ids, p["key"], p["depth"], p["span"])
            for ids, p in ev._needle_jobs([float(d) for d in args.depths.split(",")])]
    tests = ("post_group", "post_head", "pre_group", "pre_head")
    totals = {name: {"hits": 0, "cases": 0, "view": [], "fresh": [], **{t: [] for t in tests}} for name in specs}
    full_hits = 0
    cases = []
    t0 = time.time()
    for n, (ids, key, depth, span) in enumerate(jobs):
        store, logits, query = PrefillJob(llm.engine, ids, llm.prefill_chunk, track_scores=False).run()
        first = int(logits[0].argmax())
        full = llm.generate(ids, max_new_tokens=args.new, temperature=0.0, ignore_eos=True)
        full_hit = key in full.text
        full_hits += full_hit
        # answer steps: the decode steps whose output is a digit in the full cache's answer (step i
        # feeds output token i and produces token i + 1)
        digit = [any(c.isdigit() for c in llm.codec.decode([t])) for t in full.token_ids]
        answer = [i for i in range(args.new - 1) if digit[i + 1]] or list(range(args.new - 1))
        case = {"key": key, "depth": depth, "full": full.text, "full_hit": full_hit}
        for name, spec in specs.items():
            lay = parse_kv_spec(spec).retrieval.layout(len(ids))
            pages = set(range((span[0] - lay.sink) // lay.page, (span[1] - 1 - lay.sink) // lay.page + 1))
            needle_pages = torch.tensor(sorted(pages))
            d = Driver(llm, spec, store.clone(), [q.copy() for q in query], len(ids), first, args.new)
            out, prev_pre, prev_post = [first], None, None
            cover_view, cover_fresh, rates = [], [], {t: [] for t in tests}
            for step in range(args.new - 1):
                token, attended, q = d.step()
                out.append(token)
                fresh = torch.as_tensor(d.r.pool.select(None, q, lay.k_pages, d.r.combine))  # [L, 1, Hkv, k]
                has = lambda sel: torch.isin(sel, needle_pages).any(-1).float().mean().item()  # noqa: E731
                if step in answer:
                    cover_view.append(has(attended))
                    cover_fresh.append(has(fresh))
                pre = unrotate(q, d.position - 1, inv_freq)
                if prev_post is not None:
                    g, h = drift(q, prev_post, m.n_kv_heads, 0.9)
                    rates["post_group"].append(g.float().mean().item())
                    rates["post_head"].append(h.float().mean().item())
                    g, h = drift(pre, prev_pre, m.n_kv_heads, 0.9)
                    rates["pre_group"].append(g.float().mean().item())
                    rates["pre_head"].append(h.float().mean().item())
                prev_post, prev_pre = q, pre
            d.r.close()
            text = llm.codec.decode(out)
            hit = key in text
            tot = totals[name]
            tot["hits"] += hit
            tot["cases"] += 1
            tot["view"].append(sum(cover_view) / len(cover_view))
            tot["fresh"].append(sum(cover_fresh) / len(cover_fresh))
            for t in tests:
                tot[t].append(sum(rates[t]) / max(1, len(rates[t])))
            case[name] = {"text": text, "hit": hit, "view_cover": cover_view, "fresh_cover": cover_fresh,
                          "rates": {t: sum(v) / max(1, len(v)) for t, v in rates.items()}}
        cases.append(case)
        print(f"[{n + 1}/{len(jobs)}] {time.time() - t0:.0f}s key {key} depth {depth} full={full_hit} "
              + " ".join(f"{k}={case[k]['hit']}" for k in specs), flush=True)

    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    print(f"\nneedle at {args.context}, budget {args.budget}, {len(jobs)} cases; full cache {full_hits}/{len(jobs)}")
    print("| variant | hits | needle in attended view (answer steps) | needle in fresh selection | "
          "drift rate post-RoPE group / head | pre-RoPE group / head |")
    print("|---|---|---|---|---|---|")
    for name, t in totals.items():
        print(f"| {name} | {t['hits']}/{t['cases']} | {mean(t['view']):.3f} | {mean(t['fresh']):.3f} | "
              f"{mean(t['post_group']):.3f} / {mean(t['post_head']):.3f} | "
              f"{mean(t['pre_group']):.3f} / {mean(t['pre_head']):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "full_hits": full_hits, "cases": cases,
                       "summary": {k: {"hits": v["hits"], "cases": v["cases"], "view": mean(v["view"]),
                                       "fresh": mean(v["fresh"]),
                                       **{t: mean(v[t]) for t in tests}} for k, v in totals.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
