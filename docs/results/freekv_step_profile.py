"""Where a FreeKV decode step's time goes (issue 16, item 2): graph, selection, recall, correction, Python.

One prefill of a haystack prompt, then greedy decoding driven as the runtime drives a retrieval row
(``freekv_needle_trace.Driver``), with wall-clock timers around each part. The worker thread's
preparation of the next view (selection + recall + mask) runs beside the graph; only what the step
waits for is on the critical path.

    python docs/results/freekv_step_profile.py /tmp/smol --context 7680 --steps 64 --spec freekv:budget=1024

Prints per-step milliseconds (median and mean over the steps) of: the graph call, prefetch
(submitting the worker), finish_step's wait for the worker, appending the token, the drift test,
the correction's selection and recall, and the remainder of the step (Python bookkeeping);
and, off the critical path, the worker's selection and recall.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import kvtrt  # noqa: E402
from freekv_needle_trace import Driver  # noqa: E402
from kvtrt.eval.texts import load_texts, token_prefix  # noqa: E402
from kvtrt.runtime.kv import freekv as fk  # noqa: E402
from kvtrt.runtime.prefill import PrefillJob  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(cls, name: str, label: str | None = None):
    """Wrap ``cls.name`` to add its wall time to TIMES[label] (per thread: worker calls get 'worker.')."""
    fn = getattr(cls, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            where = "worker." if threading.current_thread().name.startswith("kvtrt-freekv") else ""
            STEP[where + (label or name)] += time.perf_counter() - t

    setattr(cls, name, wrapper)


STEP: dict[str, float] = defaultdict(float)


def _timed_fn(fn, label: str):
    """``fn`` adding its wall time to STEP[label]."""
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            STEP[label] += time.perf_counter() - t
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("--context", type=int, default=7680)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--spec", action="append", help="KV specs (repeatable); default freekv:budget=1024 at tau 0.9")
    ap.add_argument("--json")
    args = ap.parse_args()
    specs = args.spec or ["freekv:budget=1024"]

    llm = kvtrt.load(args.export, prefix_cache=0)
    ids = token_prefix(llm.codec.encode, load_texts(None), args.context)
    store, logits, query = PrefillJob(llm.engine, ids, llm.prefill_chunk, track_scores=False).run()

    timed(fk.FreeKVRetrieval, "_select", "select")
    timed(fk.FreeKVRetrieval, "recall")
    timed(fk.FreeKVRetrieval, "_needs_correction", "drift_test")
    timed(fk.FreeKVRetrieval, "_append_token", "append_token")
    timed(fk.FreeKVRetrieval, "_drain", "wait_worker")
    timed(fk.FreeKVRetrieval, "prefetch")
    timed(fk.FreeKVRetrieval, "finish_step")
    timed(fk.FreeKVRetrieval, "_correct", "correction")
    timed(fk.FreeKVRetrieval, "refresh")  # select=previous (the CPU default): after the step, with its query
    timed(fk.PagePool, "select", "pool_select")
    timed(fk.KVView, "put_pages")
    fk._placement = _timed_fn(fk._placement, "placement")
    timed(fk.KVView, "update_mask")
    timed(fk.KVView, "copy_unpaged")
    timed(type(llm.engine), "run", "graph")
    report = {}
    for spec in specs:
        d = Driver(llm, spec, store.clone(), [q.copy() for q in query], len(ids), int(logits[0].argmax()),
                   args.steps + 8)
        for _ in range(4):  # warm-up
            d.step()
        rows = defaultdict(list)
        for _ in range(args.steps):
            STEP.clear()
            t = time.perf_counter()
            logits = d.row.step()  # the runtime's step alone (``Driver.step`` also copies what it attended)
            total = time.perf_counter() - t
            seq = d.row.seq
            seq.pending, seq.position = int(logits.argmax()), seq.position + 1
            for k, v in STEP.items():
                rows[k].append(v * 1e3)
            rows["step"].append(total * 1e3)
        st = d.r.stats()
        d.r.close()
        crit = ("graph", "prefetch", "finish_step", "refresh")
        rows["python"] = [s - sum(rows[c][i] for c in crit if c in rows) for i, s in enumerate(rows["step"])]
        summary = {k: {"median_ms": statistics.median(v), "mean_ms": sum(v) / len(v)} for k, v in rows.items()}
        summary["correction_rate"] = st.correction_rate
        summary["pages_recalled_per_step"] = st.pages_recalled_per_step
        report[spec] = summary
        print(f"\n{spec} at {len(ids)} tokens, {args.steps} steps: correction rate {st.correction_rate:.2f}, "
              f"pages recalled per step {st.pages_recalled_per_step:.1f}")
        print("| part | median ms | mean ms |\n|---|---|---|")
        order = ["step", "graph", "prefetch", "finish_step", "wait_worker", "append_token", "correction",
                 "drift_test", "refresh", "pool_select", "select", "recall", "placement", "put_pages", "update_mask", "copy_unpaged", "python",
                 "worker.select", "worker.recall", "worker.copy_unpaged", "worker.update_mask"]
        for k in order + sorted(set(rows) - set(order)):
            if k in rows:
                print(f"| {k} | {summary[k]['median_ms']:.2f} | {summary[k]['mean_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "report": report}, indent=1))


if __name__ == "__main__":
    main()
