"""`kvtrt bench-serve DIR`: the continuous-batching scheduler under concurrent load, per KV spec, optionally
beside OpenVINO GenAI's `ContinuousBatchingPipeline` on the same model and the same token ids.

For each concurrency level C, `--requests` requests (default 2*C) are kept in flight by C client
threads: each thread submits one request through `llm.submit`, drains its stream, then submits the
next, so C requests are in the system at any time until the pool runs out. Prompts are distinct
slices of the haystack essays (no two share a prefix), of a length drawn uniformly from
`--prompt-tokens LO,HI`, greedy, `--new-tokens` each. Every (level, engine, spec) runs in its own
subprocess, the levels in the outer loop and the engines interleaved inside, so a noisy phase of
the host hits every engine alike: compare ratios within one run.

Per level and spec (times from the engines' own per-token timestamps):
- aggregate output tok/s: all generated tokens / wall time (first submission -> last token);
- decode-phase tok/s: tokens generated while no request was being prefilled (requests waiting for
  admission do not count as prefilling) divided by that time: the batch's pure decode throughput,
  at the mean batch reported beside it (`decode_batch`); `decode_full_tok_s` is the same restricted
  to the moments when all C requests were decoding (None when that never happened);
- TTFT p50/p99 (submission -> first token, queueing included), inter-token latency p50/p99 (gaps
  between consecutive tokens of a request, over all requests), end-to-end p50/p99;
- CPU seconds the process used for the level (all threads; loading and warm-up excluded) and the mean
  cores it got (CPU s / wall s): on a shared host an engine with more threads gets a larger share;
- peak KV bytes and peak running/waiting requests, polled from `llm.stats()` every 10 ms (the KV
  peak is at least the largest single request's `stats.kv_bytes`).

The prefill probe (`--probe`): `--probe-streams` requests are decoding when a `--probe-tokens` prompt
arrives; reported are the streams' inter-token latency p50/p99 while it is prefilled (its submission
-> its first token) and before it arrived (baseline).

`--peer openvino` runs OpenVINO GenAI's ContinuousBatchingPipeline (converted once with
optimum-intel, fp32 weights) with the same C-in-flight client pattern (a driver thread steps the
pipeline and adds the next request when one ends, as C closed-loop clients would), full cache with
its CPU default u8 KV and with f32 KV, and with its own cache eviction (SnapKV, KVCrush) at
`--peer-budget` of the mean prompt in 32-token blocks.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DEFAULT_SPECS = ["full", "kvcrush:budget=0.25,base=snapkv", "freekv:budget=1024",
                 "kvcrush:budget=0.25,base=snapkv+freekv:budget=1024"]
PEER_CONFIGS = ("full-u8", "full-f32", "snapkv", "kvcrush")
ROW_TAG = "KVTRT_SERVE_BENCH_ROW "
#: plain greedy, every request exactly its max_new_tokens (as the peer: ignore_eos, min_new_tokens)
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)


@dataclass
class Trace:
    """One request as the engine timed it (time.perf_counter() seconds)."""

    prompt_tokens: int
    submitted: float
    admitted: float | None = None  # None: the engine does not say (the peer); prefill then counts from submission
    times: list[float] = field(default_factory=list)  # one per generated token
    finished: float = 0.0
    kv_bytes: int = 0
    tokens: list[int] = field(default_factory=list)  # the generated ids (the peer's driver records them)

    @property
    def first(self) -> float | None:
        return self.times[0] if self.times else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None when empty."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return float(data[low] + (data[high] - data[low]) * (rank - low))


# -- prompts -------------------------------------------------------------------------------------
def corpus_ids(encode, texts: list[tuple[str, str]]) -> list[int]:
    ids: list[int] = []
    for _, text in texts:
        ids += encode(text + "\n\n")
    return ids


def make_prompts(ids: list[int], count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of lengths uniform in [low, high], each starting at a different offset of the
    corpus `ids` (spread by the golden ratio, so no two prompts share a prefix)."""
    if len(ids) <= high:
        raise ValueError(f"the texts hold {len(ids)} tokens; prompts of up to {high} need more text")
    rng = random.Random(seed)
    room = len(ids) - high
    prompts = []
    for i in range(count):
        start = int(((i + 1) * 0.6180339887498949 % 1.0) * room)
        prompts.append(ids[start:start + rng.randint(low, high)])
    return prompts


# -- metrics -------------------------------------------------------------------------------------
def decode_phase(traces: list[Trace], concurrency: int) -> dict[str, float | None]:
    """Tokens per second while no request was being prefilled (and, `full`, while all `concurrency`
    requests were decoding), with the time-weighted mean number of decoding requests.

    A request prefills from its admission (else its submission) to its first token and decodes
    from its first token to its last; the time line is cut at every such boundary, and a segment
    counts its tokens (timestamps in (start, end], first tokens excluded: they end a prefill)."""
    spans = [((t.admitted if t.admitted is not None else t.submitted), t.times[0], t.times[-1])
             for t in traces if t.times]
    stamps = sorted(x for t in traces for x in t.times[1:])
    cuts = sorted({x for s in spans for x in s})
    total = {"tok": 0, "time": 0.0, "batch": 0.0}
    full = {"tok": 0, "time": 0.0}
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        mid = (a + b) / 2
        prefilling = sum(1 for p, f, _ in spans if p < mid < f)
        decoding = sum(1 for _, f, last in spans if f < mid < last)
        if prefilling or not decoding:
            continue
        tokens = bisect.bisect_right(stamps, b) - bisect.bisect_right(stamps, a)
        total["tok"] += tokens
        total["time"] += b - a
        total["batch"] += decoding * (b - a)
        if decoding >= concurrency:
            full["tok"] += tokens
            full["time"] += b - a
    return {"decode_tok_s": total["tok"] / total["time"] if total["time"] > 0 else None,
            "decode_batch": total["batch"] / total["time"] if total["time"] > 0 else None,
            "decode_time_s": total["time"],
            "decode_full_tok_s": full["tok"] / full["time"] if full["time"] > 0 else None,
            "decode_full_time_s": full["time"]}


def summarize(traces: list[Trace], concurrency: int, gauges: dict | None = None) -> dict[str, Any]:
    """A level's row from its request traces (and the polled scheduler gauges)."""
    done = [t for t in traces if t.times]
    start = min(t.submitted for t in traces)
    end = max(t.times[-1] for t in done) if done else start
    wall = end - start
    tokens = sum(len(t.times) for t in traces)
    itl = [b - a for t in done for a, b in zip(t.times, t.times[1:])]
    ttft = [t.first - t.submitted for t in done]
    e2e = [t.times[-1] - t.submitted for t in done]
    row: dict[str, Any] = {"concurrency": concurrency, "requests": len(traces), "output_tokens": tokens,
                           "prompt_tokens": sum(t.prompt_tokens for t in traces), "wall_s": wall,
                           "throughput_tok_s": tokens / wall if wall > 0 else 0.0}
    row.update(decode_phase(traces, concurrency))
    per_request = [(len(t.times) - 1) / (t.times[-1] - t.times[0]) for t in done
                   if len(t.times) > 1 and t.times[-1] > t.times[0]]
    row["request_decode_tok_s_mean"] = sum(per_request) / len(per_request) if per_request else None
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        row[f"{name}_p50_s"] = percentile(values, 50)
        row[f"{name}_p99_s"] = percentile(values, 99)
    row["queue_wait_p50_s"] = percentile([t.admitted - t.submitted for t in traces if t.admitted is not None], 50)
    row.update(gauges or {})
    return row


# -- kvtrt ---------------------------------------------------------------------------------------
class Poller:
    """Polls `llm.stats()` on its own thread: peak KV bytes used, peak running and waiting."""

    def __init__(self, llm, period: float = 0.01):
        self.llm, self.period = llm, period
        self.peak = {"kv_peak_bytes": 0, "running_peak": 0, "waiting_peak": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.llm.stats()
            self.peak["kv_peak_bytes"] = max(self.peak["kv_peak_bytes"], s.kv_bytes_used)
            self.peak["running_peak"] = max(self.peak["running_peak"], s.running)
            self.peak["waiting_peak"] = max(self.peak["waiting_peak"], s.waiting)
            self._stop.wait(self.period)

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _trace_of(result) -> Trace:
    s = result.stats
    n = len(result.token_ids)
    return Trace(prompt_tokens=s.prompt_tokens, submitted=s.submitted_at, admitted=s.admitted_at,
                 times=list(s.token_times[:n]) if n else [], finished=s.finished_at, kv_bytes=s.kv_bytes)


def kvtrt_level(llm, prompts: list[list[int]], concurrency: int, new_tokens: int, kv: str | None = None,
                progress=None) -> dict[str, Any]:
    """`len(prompts)` requests kept `concurrency` in flight by as many client threads (greedy)."""
    pending = list(range(len(prompts)))
    lock = threading.Lock()
    traces: list[Trace | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                i = pending.pop(0)
            try:
                request = llm.submit(prompts[i], max_new_tokens=new_tokens, kv=kv, **GREEDY)
                for _ in request:
                    pass
                traces[i] = _trace_of(request.result())
            except BaseException as error:  # reported once the level ends
                errors.append(error)
                return
            if progress is not None:
                progress(len(traces[i].times))

    with Poller(llm) as poller:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, len(prompts)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    row = summarize(traces, concurrency, poller.peak)
    row["request_kv_bytes_max"] = max(t.kv_bytes for t in traces)
    row["kv_peak_bytes"] = max(row["kv_peak_bytes"], row["request_kv_bytes_max"])  # polling can miss a short peak
    return row


def _itl_windows(traces: list[Trace], windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Inter-token gaps of the traces whose later token falls in each (start, end] window."""
    out: dict[str, Any] = {}
    for name, (a, b) in windows.items():
        gaps = [y - x for t in traces for x, y in zip(t.times, t.times[1:]) if a < y <= b]
        out[f"{name}_itl_p50_s"] = percentile(gaps, 50)
        out[f"{name}_itl_p99_s"] = percentile(gaps, 99)
        out[f"{name}_gaps"] = len(gaps)
        out[f"{name}_s"] = b - a
    p50, p99, base = out.get("prefill_itl_p50_s"), out.get("prefill_itl_p99_s"), out.get("baseline_itl_p50_s")
    out["p99_over_p50"] = p99 / p50 if p50 and p99 is not None else None
    out["p99_over_baseline_p50"] = p99 / base if base and p99 is not None else None
    return out


def kvtrt_probe(llm, streams: list[list[int]], long_prompt: list[int], kv: str | None = None,
                baseline_tokens: int = 16) -> dict[str, Any]:
    """Inter-token latency of running streams before and while `long_prompt` is prefilled."""
    room = llm.manifest.max_positions - max(len(p) for p in streams) - 1
    requests = [llm.submit(p, max_new_tokens=min(1024, room), kv=kv, **GREEDY) for p in streams]
    while True:  # every stream decoding, nothing prefilling
        s = llm.stats()
        if s.running >= len(streams) and not s.prefilling and not s.waiting:
            break
        if any(r.done for r in requests):
            raise RuntimeError("a probe stream ended before the probe; give the streams more room")
        time.sleep(0.005)
    g0 = llm.stats().generation_tokens_total
    t_base = time.perf_counter()
    while llm.stats().generation_tokens_total < g0 + baseline_tokens * len(streams):
        time.sleep(0.005)
    long = llm.submit(long_prompt, max_new_tokens=2, kv=kv, **GREEDY)
    stats = long.result().stats
    t0, t1 = stats.submitted_at, stats.token_times[0]
    for r in requests:
        r.cancel()
    traces = [_trace_of(r.result()) for r in requests]
    row = {"streams": len(streams), "stream_prompt_tokens": len(streams[0]), "probe_tokens": len(long_prompt),
           "probe_prefill_s": t1 - t0}
    row.update(_itl_windows(traces, {"baseline": (t_base, t0), "prefill": (t0, t1)}))
    return row


def load_kvtrt(directory: str, kv: str, threads: int, prefill_chunk: int, kv_memory: int | None, max_batch: int,
               prefix_cache: str | int = 0):
    from ..runtime.llm import load

    llm = load(directory, kv=kv, threads=threads, prefill_chunk=prefill_chunk, kv_memory=kv_memory,
               max_batch=max_batch, prefix_cache=prefix_cache)
    # warm the sessions (256 tokens: a fractional compaction budget must still hold its sink + window)
    warm = min(256, llm.manifest.max_positions // 2)
    llm.generate([10 + i % 200 for i in range(warm)], max_new_tokens=4, **GREEDY)
    return llm


# -- OpenVINO GenAI ------------------------------------------------------------------------------
def openvino_pipeline(model_dir: str, config: str, threads: int | None, budget: int, prefill_chunk: int,
                      max_batch: int, eviction=None):
    """The ContinuousBatchingPipeline for one peer config: full-u8 (its CPU default KV precision),
    full-f32, snapkv / kvcrush (its cache eviction at `budget` tokens, f32 KV; `eviction`: a
    `CacheEvictionConfig` to use instead, as `kvtrt eval --peer openvino` builds it). `threads` None:
    its default."""
    import openvino_genai as ov_genai

    from .peers import openvino_eviction

    sc = ov_genai.SchedulerConfig()
    sc.max_num_seqs = max_batch
    sc.dynamic_split_fuse = True
    sc.max_num_batched_tokens = prefill_chunk
    sc.enable_prefix_caching = False
    if config in ("snapkv", "kvcrush"):
        sc.use_cache_eviction = True
        sc.cache_eviction_config = eviction if eviction is not None else openvino_eviction(config, budget)
    elif config not in ("full-u8", "full-f32"):
        raise ValueError(f"OpenVINO peer config {config!r} is unknown; use one of {', '.join(PEER_CONFIGS)}")
    # f32 compute like the fp32 kvtrt export (this CPU would otherwise run bf16, which also forces bf16 KV)
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    if config != "full-u8":
        properties["KV_CACHE_PRECISION"] = "f32"
    pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), sc, "CPU", properties)
    openvino_drive(pipe, [list(range(10, 42))], 1, 4)  # warm up
    return pipe


def openvino_generation_config(new_tokens: int, stop_ids: Sequence[int] | None = None):
    """Greedy, exactly `new_tokens` tokens (EOS ignored); with `stop_ids`, up to `new_tokens` ending at
    the first of those ids."""
    import openvino_genai as ov_genai

    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = new_tokens
    cfg.do_sample = False
    if stop_ids:
        cfg.eos_token_id = stop_ids[0]
        cfg.stop_token_ids = set(stop_ids)
    else:
        cfg.min_new_tokens = new_tokens
        cfg.ignore_eos = True
    return cfg


def openvino_drive(pipe, prompts: list[list[int]], concurrency: int, new_tokens: int, progress=None,
                   on_step=None, configs: list | None = None, handles: dict | None = None,
                   kv_estimate=None) -> list[Trace]:
    """Keep `concurrency` requests in the pipeline (a new one added as one ends), stepping it on this
    thread; each token is timed right after the step that produced it (and its id kept in `Trace.tokens`)."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    default = openvino_generation_config(new_tokens)
    traces: list[Trace] = []
    active: dict[int, Any] = {} if handles is None else handles

    def add() -> None:
        i = len(traces)
        ids = ov.Tensor(np.array([prompts[i]], dtype=np.int64))
        traces.append(Trace(prompt_tokens=len(prompts[i]), submitted=time.perf_counter()))
        active[i] = pipe.add_request(i, ids, configs[i] if configs else default)

    for _ in range(min(concurrency, len(prompts))):
        add()
    while active:
        pipe.step()
        now = time.perf_counter()
        for i, handle in list(active.items()):
            while handle.can_read():
                for output in handle.read().values():
                    traces[i].times += [now] * len(output.generated_ids)
                    traces[i].tokens += output.generated_ids
            if handle.get_status() != ov_genai.GenerationStatus.RUNNING:
                del active[i]
                traces[i].finished = now
                if progress is not None:
                    progress(len(traces[i].times))
                if len(traces) < len(prompts) and on_step is None:
                    add()
        if kv_estimate is not None:
            kv_estimate(traces, active)
        if on_step is not None and on_step(traces, active, add):
            break
    return traces


def openvino_level(pipe, prompts: list[list[int]], concurrency: int, new_tokens: int, progress=None,
                   token_bytes: float | None = None, budget: int | None = None) -> dict:
    """A level on the pipeline; with `token_bytes` (KV bytes per token) the peak KV is estimated after
    every step from the live requests' tokens (whole 32-token blocks, at most `budget` + 2 blocks
    per request under eviction); the pipeline itself reports only a usage percentage."""
    from .peers import OPENVINO_BLOCK

    peak = {"kv_peak_bytes": 0, "running_peak": 0}

    def kv_estimate(traces, active) -> None:
        total = 0
        for i in active:
            tokens = traces[i].prompt_tokens + len(traces[i].times)
            if budget:
                tokens = min(tokens, budget + 2 * OPENVINO_BLOCK)
            total += -(-tokens // OPENVINO_BLOCK) * OPENVINO_BLOCK
        peak["kv_peak_bytes"] = max(peak["kv_peak_bytes"], int(total * token_bytes))
        peak["running_peak"] = max(peak["running_peak"], len(active))

    traces = openvino_drive(pipe, prompts, concurrency, new_tokens, progress,
                            kv_estimate=kv_estimate if token_bytes else None)
    metrics = pipe.get_metrics()
    if not token_bytes:
        peak["kv_peak_bytes"] = None
    return summarize(traces, concurrency, {**peak, "kv_peak_estimated": True,
                                           "cache_usage_peak_pct": metrics.max_cache_usage})


def openvino_probe(pipe, streams: list[list[int]], long_prompt: list[int], baseline_tokens: int = 16) -> dict:
    """The same probe as `kvtrt_probe` on the OpenVINO pipeline (streams ended once the probe's first
    token is out)."""
    prompts = streams + [long_prompt]
    configs = [openvino_generation_config(max(1024, 8 * baseline_tokens))] * len(streams) + \
        [openvino_generation_config(2)]
    state: dict[str, float] = {}

    def on_step(traces, active, add) -> bool:
        now = time.perf_counter()
        streaming = traces[:len(streams)]
        if "base" not in state:
            if len(traces) == len(streams) and all(t.times for t in streaming):
                state["base"], state["count"] = now, sum(len(t.times) for t in streaming)
            return False
        if "t0" not in state:
            if sum(len(t.times) for t in streaming) >= state["count"] + baseline_tokens * len(streams):
                add()
                state["t0"] = traces[-1].submitted
            return False
        probe = traces[len(streams)]
        if probe.times:
            state["t1"] = probe.times[0]
            return True
        return False

    # all streams start at once; the probe is added by on_step
    handles: dict = {}
    traces = openvino_drive(pipe, prompts, len(streams), 0, on_step=on_step, configs=configs, handles=handles)
    for handle in handles.values():
        handle.cancel()  # end the streams
    _openvino_finish(pipe)
    row = {"streams": len(streams), "stream_prompt_tokens": len(streams[0]), "probe_tokens": len(long_prompt),
           "probe_prefill_s": state["t1"] - state["t0"]}
    row.update(_itl_windows(traces[:len(streams)], {"baseline": (state["base"], state["t0"]),
                                                    "prefill": (state["t0"], state["t1"])}))
    return row


def _openvino_finish(pipe) -> None:
    """Step the pipeline until its requests end (the probe's streams run to their length)."""
    while pipe.has_non_finished_requests():
        pipe.step()


# -- one job (in this process or a worker) ---------------------------------------------------------
def _cpu_s() -> float:
    """CPU seconds this process has used, all threads (user + system)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_job(job: dict, prompts: dict, progress=None) -> dict:
    """One (engine, config) at one level, or its prefill probe; returns the row (with the CPU seconds
    the measured part used, loading and warm-up excluded: on a shared host the engine that runs more
    threads gets more of the cores, and CPU time per token does not depend on that share)."""
    t0 = time.perf_counter()
    if job["engine"] == "kvtrt":
        llm = load_kvtrt(job["dir"], job["kv"], job["threads"], job["prefill_chunk"], job.get("kv_memory"),
                         job["max_batch"], job.get("prefix_cache", 0))
        try:
            cpu = _cpu_s()
            if job["kind"] == "probe":
                row = kvtrt_probe(llm, prompts["probe_streams"], prompts["probe_long"])
            else:
                row = kvtrt_level(llm, prompts["requests"][:job["requests"]], job["concurrency"], job["new_tokens"],
                                  progress=progress)
            row["cpu_s"] = _cpu_s() - cpu
            row["decode_attention"] = getattr(llm.engine, "decode_attention", None)  # the kvtrt kernel or ORT's op
        finally:
            llm.close()
    else:
        from .peers import openvino_kv_bytes_per_token

        pipe = openvino_pipeline(job["peer_dir"], job["kv"], job["threads"], job["peer_budget"], job["prefill_chunk"],
                                 job["max_batch"])
        cpu = _cpu_s()
        if job["kind"] == "probe":
            row = openvino_probe(pipe, prompts["probe_streams"], prompts["probe_long"])
        else:
            layers, heads, dim = job["kv_dims"]
            per_token = openvino_kv_bytes_per_token(layers, heads, dim, "u8" if job["kv"] == "full-u8" else "f32")
            budget = job["peer_budget"] if job["kv"] in ("snapkv", "kvcrush") else None
            row = openvino_level(pipe, prompts["requests"][:job["requests"]], job["concurrency"], job["new_tokens"],
                                 progress=progress, token_bytes=per_token, budget=budget)
        row["cpu_s"] = _cpu_s() - cpu
        del pipe
    if "output_tokens" in row:
        row["cpu_ms_per_token"] = 1000 * row["cpu_s"] / max(row["output_tokens"], 1)
        row["cpu_share"] = row["cpu_s"] / row["wall_s"] if row["wall_s"] > 0 else None  # cores used on average
    row = {"kind": job["kind"], "engine": job["engine"], "kv": job["kv"], **row,
           "kv_memory_bytes": job.get("kv_memory"), "job_s": time.perf_counter() - t0}
    if job["engine"] == "openvino":
        row["peer_budget"] = job["peer_budget"] if job["kv"] in ("snapkv", "kvcrush") else None
        row["kv_precision"] = "u8" if job["kv"] == "full-u8" else "f32"
    else:
        row["kv_precision"] = "fp32"
    from .bench import peak_rss_mib

    row["peak_rss_mib"] = peak_rss_mib()
    return row


def _spawn(job: dict, prompts_file: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
    proc = subprocess.run([sys.executable, "-m", "kvtrt.eval.concurrency", json.dumps(job), prompts_file],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_TAG):
            return json.loads(line[len(ROW_TAG):])
    raise RuntimeError(f"bench-serve worker failed ({job['engine']} {job['kv']}, {job['kind']} "
                       f"C={job.get('concurrency')}):\n{proc.stderr[-3000:]}")


def resolve_kv_memory(value: str | int | None, manifest, high: int, new_tokens: int) -> int | None:
    """`--kv-memory`: a size ('2GiB', bytes), or 'Kx': what admission needs to run K full-cache requests
    of the longest prompt at once (K decoding rows of HIGH + new tokens, plus one prompt being prefilled)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower().endswith("x"):
        k = float(value.strip()[:-1])
        bpt = manifest.kv_bytes_per_token
        return int((high + k * (high + new_tokens)) * bpt)
    from ..runtime.llm import parse_bytes

    return parse_bytes(value)


def run_serve_bench(directory: str, concurrency: Sequence[int] = (1, 4, 8, 16), kv_specs: Sequence[str] = DEFAULT_SPECS,
                    requests: int | None = None, requests_per_c: float = 2.0, new_tokens: int = 128,
                    prompt_tokens: tuple[int, int] = (2048, 4096), threads: int = 2, kv_memory: str | int | None = None,
                    peer: str | None = None, peer_dir: str | None = None, peer_configs: Sequence[str] = PEER_CONFIGS,
                    peer_budget: float = 0.25, texts: str | None = None, prefill_chunk: int = 512,
                    max_batch: int = 32, probe: bool = True, probe_tokens: int = 4096, probe_streams: int = 4,
                    probe_stream_tokens: int = 1024, probe_kv: Sequence[str] | None = None, isolate: bool = True,
                    seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Run every level x config (and the probes); returns {"config", "rows", "probes"}."""
    from tqdm.auto import tqdm

    from ..manifest import Manifest
    from ..runtime.tokenizer import TextCodec
    from .texts import load_texts

    manifest = Manifest.load(directory)
    low, high = prompt_tokens
    if not 1 <= low <= high or high + new_tokens > manifest.max_positions:
        raise ValueError(f"--prompt-tokens {low},{high} + {new_tokens} new tokens must fit the export's "
                         f"{manifest.max_positions} positions (and LO <= HI)")
    if probe and probe_tokens + 2 > manifest.max_positions:
        raise ValueError(f"--probe-tokens {probe_tokens} exceeds the export's {manifest.max_positions} positions")
    counts = {c: requests or max(c, int(round(requests_per_c * c))) for c in concurrency}
    codec = TextCodec(directory, manifest)
    ids = corpus_ids(codec.encode, load_texts(texts))
    pool = make_prompts(ids, max(counts.values()), low, high, seed)
    stream_len = probe_stream_tokens
    if probe and stream_len + 64 > manifest.max_positions:
        raise ValueError(f"--probe-stream-tokens {stream_len} leaves the streams no room to decode in the export's "
                         f"{manifest.max_positions} positions")
    prompts = {"requests": pool,
               "probe_long": make_prompts(ids, 1, probe_tokens, probe_tokens, seed + 1)[0] if probe else [],
               "probe_streams": make_prompts(ids[len(ids) // 3:] + ids[:len(ids) // 3], probe_streams, stream_len,
                                             stream_len, seed + 2) if probe else []}
    cap = resolve_kv_memory(kv_memory, manifest, high, new_tokens)
    mean_prompt = sum(len(p) for p in pool) / len(pool)
    budget = int(peer_budget * mean_prompt) if peer_budget < 1 else int(peer_budget)
    if peer:
        if peer != "openvino":
            raise ValueError(f"--peer {peer!r} is unknown; bench-serve supports 'openvino'")
        from .peers import build_openvino, openvino_directory

        peer_dir = str(build_openvino(directory, Path(openvino_directory(directory, peer_dir))))
    configs = [("kvtrt", kv) for kv in kv_specs] + ([("openvino", c) for c in peer_configs] if peer else [])
    base = {"dir": str(directory), "peer_dir": peer_dir, "threads": threads, "prefill_chunk": prefill_chunk,
            "max_batch": max_batch, "new_tokens": new_tokens, "peer_budget": budget,
            "kv_dims": [manifest.n_layers, manifest.n_kv_heads, manifest.head_dim]}
    jobs = [{**base, "kind": "level", "engine": e, "kv": kv, "concurrency": c, "requests": counts[c],
             "kv_memory": cap if e == "kvtrt" else None} for c in concurrency for e, kv in configs]
    if probe:
        wanted = set(probe_kv or ["full", "full-f32"])
        jobs += [{**base, "kind": "probe", "engine": e, "kv": kv} for e, kv in configs if kv in wanted]
    total_tokens = sum(j["requests"] * new_tokens for j in jobs if j["kind"] == "level") + len(jobs) - len(
        [j for j in jobs if j["kind"] == "level"])
    rows, probes, failures = [], [], []
    bar = tqdm(total=total_tokens, unit="tok", desc="bench-serve", disable=not progress, dynamic_ncols=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = str(Path(tmp) / "prompts.json")
        Path(prompts_file).write_text(json.dumps(prompts))
        for job in jobs:
            where = f" C={job['concurrency']}" if job["kind"] == "level" else " probe"
            label = f"{job['engine']} {job['kv']}{where}"
            bar.set_postfix_str(label)
            try:
                row = _spawn(job, prompts_file) if isolate else run_job(job, prompts, progress=None)
            except RuntimeError as error:  # one failed job does not lose the run: said here and in the JSON
                bar.write(f"FAILED {label}: {error}")
                failures.append({**job, "error": str(error)[-2000:]})
                continue
            if job["kind"] == "level":
                bar.update(job["requests"] * new_tokens)
                rows.append(row)
            else:
                bar.update(1)
                probes.append(row)
            bar.write(_format_row(row))
    bar.close()
    config = {"dir": str(directory), "model": manifest.source, "dtype": manifest.dtype,
              "kv_dtype": manifest.kv_dtype, "threads": threads,
              "new_tokens": new_tokens, "prompt_tokens": [low, high], "mean_prompt_tokens": mean_prompt,
              "requests": counts, "kv_memory_bytes": cap, "kv_memory_arg": kv_memory, "prefill_chunk": prefill_chunk,
              "max_batch": max_batch, "peer": peer, "peer_budget_tokens": budget if peer else None,
              "probe": {"tokens": probe_tokens, "streams": probe_streams, "stream_prompt_tokens": stream_len}
              if probe else None}
    return {"config": config, "rows": rows, "probes": probes, "failures": failures}


# -- reporting -----------------------------------------------------------------------------------
def _ms(x: float | None) -> str:
    return "" if x is None else f"{x * 1000:.0f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


def _format_row(row: dict) -> str:
    if row["kind"] == "probe":
        return (f"  probe | {row['engine']:<8} | {row['kv']:<48} | prefill {row['probe_prefill_s']:.2f} s | ITL "
                f"baseline p50 {_ms(row['baseline_itl_p50_s'])} ms | during prefill p50 {_ms(row['prefill_itl_p50_s'])}"
                f" / p99 {_ms(row['prefill_itl_p99_s'])} ms")
    return (f"  C={row['concurrency']:<3} | {row['engine']:<8} | {row['kv']:<48} | {row['throughput_tok_s']:6.1f} tok/s"
            f" | decode {_num(row['decode_tok_s'])} tok/s (batch {_num(row['decode_batch'])}) | TTFT p50 "
            f"{_num(row['ttft_p50_s'], '.2f')} s | ITL p50 {_ms(row['itl_p50_s'])} ms p99 {_ms(row['itl_p99_s'])} ms"
            f" | CPU {_num(row.get('cpu_s'))} s, {_num(row.get('cpu_share'), '.2f')} cores")


def series(row: dict) -> str:
    return f"{row['engine']} {row['kv']}"


def table(report: dict) -> str:
    """Markdown: one table of levels (ratios to kvtrt full and to the OpenVINO full f32 row at the same
    level), one of probes."""
    rows = report["rows"]
    lines = ["| C | engine | kv | requests | out tok | out tok/s | decode tok/s (batch) | decode tok/s all-C | "
             "TTFT p50 / p99 s | ITL p50 / p99 ms | peak KV MiB | peak running | vs kvtrt full | "
             "vs openvino full-f32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = [r for r in rows if r["concurrency"] == row["concurrency"]]
        full = next((r for r in same if r["engine"] == "kvtrt" and r["kv"] == "full"), None)
        peer = next((r for r in same if r["engine"] == "openvino" and r["kv"] == "full-f32"), None)
        vs_full = f"{row['throughput_tok_s'] / full['throughput_tok_s']:.2f}x" if full and row is not full else ""
        vs_peer = f"{row['throughput_tok_s'] / peer['throughput_tok_s']:.2f}x" if peer and row is not peer else ""
        kv = row["kv_peak_bytes"]
        kv_text = "" if kv is None else f"{kv / 2**20:.0f}" + (" (est.)" if row.get("kv_peak_estimated") else "")
        lines.append(
            f"| {row['concurrency']} | {row['engine']} | {row['kv']} | {row['requests']} | {row['output_tokens']} | "
            f"{row['throughput_tok_s']:.1f} | {_num(row['decode_tok_s'])} ({_num(row['decode_batch'])}) | "
            f"{_num(row['decode_full_tok_s'])} | {_num(row['ttft_p50_s'], '.2f')} / {_num(row['ttft_p99_s'], '.2f')} | "
            f"{_ms(row['itl_p50_s'])} / {_ms(row['itl_p99_s'])} | {kv_text} | {row.get('running_peak', '')} | "
            f"{vs_full} | {vs_peer} |")
    if report.get("probes"):
        lines += ["", "| probe | engine | kv | probe prefill s | ITL before p50 / p99 ms | "
                      "ITL during prefill p50 / p99 ms | p99 / p50 during | p99 during / p50 before |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in report["probes"]:
            lines.append(f"| {p['probe_tokens']} tok, {p['streams']} streams | {p['engine']} | {p['kv']} | "
                         f"{p['probe_prefill_s']:.2f} | {_ms(p['baseline_itl_p50_s'])} / {_ms(p['baseline_itl_p99_s'])}"
                         f" | {_ms(p['prefill_itl_p50_s'])} / {_ms(p['prefill_itl_p99_s'])} | "
                         f"{_num(p['p99_over_p50'], '.2f')} | {_num(p['p99_over_baseline_p50'], '.1f')} |")
    return "\n".join(lines)


def plot(path: str | Path, report: dict, title: str) -> Path:
    from .plot import line_plot

    rows = [{**r, "series": series(r)} for r in report["rows"]]
    for r in rows:
        for key in ("ttft_p99_s", "itl_p99_s"):
            r[key.replace("_s", "_ms")] = None if r[key] is None else r[key] * 1000
    return line_plot(path, [("throughput_tok_s", "aggregate output tok/s"), ("decode_tok_s", "decode-phase tok/s"),
                            ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p99_ms", "inter-token p99 ms")],
                     rows, "concurrency", "series", title)


# -- command line --------------------------------------------------------------------------------
def add_bench_serve_parser(sub, kv_help: str):
    p = sub.add_parser(
        "bench-serve", help="throughput and latency of the continuous-batching scheduler under concurrent load",
        description=__doc__.split("\n\n", 1)[1], formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("dir", help="export folder")
    p.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=[1, 4, 8, 16],
                   help="comma-separated concurrency levels: client threads keeping that many requests in flight "
                        "(default 1,4,8,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default --requests-per-c x C, at least C)")
    p.add_argument("--requests-per-c", type=float, default=2.0,
                   help="requests per level as a multiple of C (default 2)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="greedy tokens generated per request, EOS ignored by both engines (default 128)")
    p.add_argument("--prompt-tokens", type=lambda t: tuple(int(x) for x in t.split(",")), default=(2048, 4096),
                   help="LO,HI: prompt lengths drawn uniformly (seeded) from distinct haystack offsets "
                        "(default 2048,4096)")
    p.add_argument("--kv", action="append",
                   help="KV spec to measure (repeatable; default: full, kvcrush:budget=0.25,base=snapkv, "
                        "freekv:budget=1024 and their combination). " + kv_help)
    p.add_argument("--kv-memory", default=None,
                   help="cap on the KV bytes of all kvtrt requests together: a size ('2GiB', bytes) or 'Kx', what "
                        "admission needs to run K full-cache requests of the longest prompt at once (K rows of "
                        "HI + new tokens plus one prompt being prefilled); default no cap. The peer runs uncapped")
    p.add_argument("--max-batch", type=int, default=32, help="sequences per decode call (kvtrt max_batch; the peer's "
                                                             "max_num_seqs)")
    p.add_argument("--prefix-cache", default="0", help="kvtrt prefix cache size (default 0: the prompts are distinct, "
                                                       "so it could only hold memory)")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the prefill probe (ITL of running streams while a long prompt is prefilled)")
    p.add_argument("--probe-tokens", type=int, default=4096, help="the probe's long prompt (default 4096 tokens)")
    p.add_argument("--probe-streams", type=int, default=4, help="streams decoding when it arrives (default 4)")
    p.add_argument("--probe-stream-tokens", type=int, default=1024, help="their prompt length (default 1024)")
    p.add_argument("--probe-kv", action="append",
                   help="configs the probe runs for (repeatable: a --kv spec or a --peer-config; default full and "
                        "full-f32)")
    p.add_argument("--peer", choices=["openvino"],
                   help="also run OpenVINO GenAI's ContinuousBatchingPipeline (converted once with optimum-intel; "
                        "set KVTRT_OPTIMUM_CLI when optimum-cli lives in another virtualenv)")
    p.add_argument("--peer-dir", help="where the OpenVINO model is converted and cached (default DIR-openvino-fp32)")
    p.add_argument("--peer-config", action="append", choices=PEER_CONFIGS,
                   help="peer configs (repeatable; default all): full-u8 (its CPU default KV precision), full-f32 "
                        "(KV_CACHE_PRECISION=f32), snapkv / kvcrush (its CacheEvictionConfig, f32 KV)")
    p.add_argument("--peer-budget", type=float, default=0.25,
                   help="the peer's eviction budget: a fraction of the mean prompt or a token count, rounded down to "
                        "32-token blocks (default 0.25); KVCrush takes 25%% of it as representative blocks")
    p.add_argument("--text", help="text file or folder for the prompts (default ../shared/data/haystack)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt lengths")
    p.add_argument("--json", help="write {config, rows, probes} as JSON here")
    p.add_argument("--plot", help="write a PNG (throughput, decode tok/s, TTFT p99, ITL p99 against concurrency)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens per prefill call and per scheduler iteration while others decode (the peer's "
                        "max_num_batched_tokens); default 512")
    p.add_argument("--in-process", action="store_true", help="run every job in this process (default: one "
                                                             "subprocess each)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench_serve)
    return p


def _cmd_bench_serve(args) -> int:
    report = run_serve_bench(args.dir, args.concurrency, args.kv or DEFAULT_SPECS, requests=args.requests,
                             requests_per_c=args.requests_per_c, new_tokens=args.new_tokens,
                             prompt_tokens=args.prompt_tokens, threads=args.threads, kv_memory=args.kv_memory,
                             peer=args.peer, peer_dir=args.peer_dir, peer_configs=args.peer_config or PEER_CONFIGS,
                             peer_budget=args.peer_budget, texts=args.text, prefill_chunk=args.prefill_chunk,
                             max_batch=args.max_batch, probe=args.probe, probe_tokens=args.probe_tokens,
                             probe_streams=args.probe_streams, probe_stream_tokens=args.probe_stream_tokens,
                             probe_kv=args.probe_kv,
                             isolate=not args.in_process, seed=args.seed, progress=not args.quiet)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(args.plot, report, f'kvtrt bench-serve {Path(args.dir).name} ({args.threads} threads)')}",
              file=sys.stderr)
    return 0


def _worker() -> None:
    job = json.loads(sys.argv[1])
    prompts = json.loads(Path(sys.argv[2]).read_text())
    row = run_job(job, prompts)
    print(ROW_TAG + json.dumps(row), flush=True)


if __name__ == "__main__":
    _worker()
