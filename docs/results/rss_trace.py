"""RSS over time in one process: imports, load, warm-up, each prefill chunk, decode.

    PYTHONPATH=. python docs/results/rss_trace.py /tmp/smol --context 7680 --kv full [--json OUT]

A thread samples VmRSS every 2 ms; `PrefillJob.step` and the decode loop are wrapped to mark
phases. Prints, per phase, the RSS at its end and the highest sample inside it, then VmHWM.
Environment knobs are read by the code under test, so set them on the command line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

T0 = time.perf_counter()


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Tracker:
    def __init__(self, period: float = 0.002):
        self.samples: list[tuple[float, float]] = []
        self.marks: list[tuple[float, str]] = [(0.0, "start")]
        self.split: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.wait(period):
            self.samples.append((time.perf_counter() - T0, rss_mib()))

    def mark(self, label: str) -> None:
        t = time.perf_counter() - T0
        self.samples.append((t, rss_mib()))
        self.marks.append((t, label))
        self.split.append((rss_mib("RssAnon"), rss_mib("RssFile")))

    def phases(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        out = []
        for (t0, _), (t1, label), (anon, file) in zip(self.marks, self.marks[1:], self.split):
            inside = [r for t, r in self.samples if t0 <= t <= t1]
            out.append({"phase": label, "end_s": round(t1, 2), "end_mib": round(inside[-1] if inside else 0, 1),
                        "max_mib": round(max(inside) if inside else 0, 1), "anon_mib": anon, "file_mib": file})
        return out


def trace_start(tracker: Tracker) -> None:
    from kvtrt.runtime import retrieval_batch
    from kvtrt.runtime.kv import freekv, views

    def wrap(owner, name, label, every=1, limit=None):
        original, calls = getattr(owner, name), [0]

        def traced(*a, **kw):
            out = original(*a, **kw)
            calls[0] += 1
            if calls[0] % every == 0 and (limit is None or calls[0] <= limit):
                tracker.mark(f"{label} {calls[0]}")
            return out
        setattr(owner, name, traced)

    wrap(freekv.FreeKVRetrieval, "_load", "start: layers in the pool", every=10)
    wrap(views.KVView, "clear", "start: view cleared")
    wrap(freekv.FreeKVRetrieval, "_prepare", "start/step: view prepared", limit=2)
    wrap(retrieval_batch._RetrievalRow, "step", "decode step", limit=3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--context", type=int, default=7680)
    p.add_argument("--kv", default="full")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--session-flag", action="append", default=[], choices=["no-cpu-arena", "no-mem-pattern"],
                   help="experiment: extra OrtSessionOptions on the shared-weight sessions")
    p.add_argument("--no-check", action="store_true", help="skip the engine's graph I/O check (experimental graphs)")
    p.add_argument("--trace-start", action="store_true",
                   help="retrieval specs: also mark inside FreeKV's start (every 10 layers moved into the pool, the views "
                        "cleared, the first view prepared) and the first 3 decode steps")
    args = p.parse_args()
    tracker = Tracker()
    import onnxruntime  # noqa: F401  (torch: only when the spec needs it, as in the runtime)

    import kvtrt
    from kvtrt.eval.texts import load_texts, token_prefix
    from kvtrt.runtime import prefill as prefill_mod
    from kvtrt.runtime.llm import load

    if args.no_check:
        from kvtrt.runtime.engine import OrtEngine
        OrtEngine._check = lambda self, variant, session: None
    if args.session_flag:
        import ctypes as C
        from kvtrt.runtime import ort_shared
        api = ort_shared.api()

        class ApiBase(C.Structure):
            _fields_ = [("GetApi", C.CFUNCTYPE(C.c_void_p, C.c_uint32)), ("GetVersionString", C.CFUNCTYPE(C.c_char_p))]
        api.lib.OrtGetApiBase.restype = C.POINTER(ApiBase)
        functions = C.cast(api.lib.OrtGetApiBase().contents.GetApi(ort_shared._API_VERSION), C.POINTER(C.c_void_p))
        table = {"no-cpu-arena": 19, "no-mem-pattern": 17}  # DisableCpuMemArena, DisableMemPattern
        base_options = ort_shared.SharedWeights._options

        def options(self, graph):
            o = base_options(self, graph)
            for flag in args.session_flag:
                fn = C.CFUNCTYPE(C.c_void_p, C.c_void_p)(functions[table[flag]])
                api.check(fn(o))
            return o
        ort_shared.SharedWeights._options = options
    tracker.mark("imports")
    llm = load(args.dir, kv=args.kv, threads=args.threads, prefill_chunk=args.prefill_chunk, prefix_cache=0)
    tracker.mark("load")
    ids = token_prefix(llm.codec.encode, load_texts(None), args.context)
    llm.generate(ids[:16], max_new_tokens=4, temperature=0.0, ignore_eos=True)
    tracker.mark("warm-up")
    step = prefill_mod.PrefillJob.step
    chunk_times = []

    def traced(self):
        t = time.perf_counter()
        n = step(self)
        chunk_times.append(time.perf_counter() - t)
        tracker.mark(f"prefill chunk {self.next}/{len(self.chunks)} (to {self.chunks[self.next - 1][1]})")
        return n

    prefill_mod.PrefillJob.step = traced
    if args.trace_start:
        trace_start(tracker)
    t = time.perf_counter()
    result = llm.generate(ids, max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    tracker.mark(f"first token + {args.new_tokens - 1} decode steps")
    llm.close()
    phases = tracker.phases()
    for ph in phases:
        print(f"{ph['phase']:<40} end {ph['end_mib']:7.1f} max {ph['max_mib']:7.1f} MiB (anon {ph['anon_mib']:6.1f}, "
              f"file {ph['file_mib']:6.1f}) t={ph['end_s']:.1f}s")
    hwm = rss_mib("VmHWM")
    s = result.stats
    print(f"VmHWM {hwm:.1f} MiB; prefill {s.prefill_s:.2f} s, decode {s.decode_tok_s:.2f} tok/s; "
          f"kv {s.kv_bytes / 2**20:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "phases": phases, "vmhwm_mib": hwm,
                                               "prefill_s": s.prefill_s, "decode_tok_s": s.decode_tok_s,
                                               "chunk_s": chunk_times, "token_ids": result.token_ids}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
