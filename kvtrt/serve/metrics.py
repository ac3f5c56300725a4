"""Prometheus metrics, vLLM-style names under `kvtrt:`, one `CollectorRegistry` per app.

Gauges and the scheduler's totals are read from `llm.stats()` at scrape time (a custom collector:
nothing to keep in sync); per-request histograms (TTFT, inter-token, end-to-end, queue time, token
counts) are observed by the server from each finished request's `stats`."""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# scheduler stats field -> (metric name without the `kvtrt:` prefix, help); gauges are read as they are
GAUGES = {
    "running": ("num_requests_running", "Requests admitted and running (prefilling or decoding)."),
    "prefilling": ("num_requests_prefilling", "Admitted requests whose prompt is being prefilled."),
    "waiting": ("num_requests_waiting", "Requests waiting for admission (KV memory or queue)."),
    "kv_bytes_used": ("kv_cache_usage_bytes", "KV bytes held by live requests (decode batches, FreeKV pools and views, prefills)."),
    "kv_bytes_cap": ("kv_cache_capacity_bytes", "The kv_memory cap in bytes (absent when unlimited)."),
    "cached_prefixes": ("cached_prefixes", "Finished conversations whose KV is kept for a next turn."),
    "cached_prefix_bytes": ("cached_prefix_bytes", "KV bytes of the cached prefixes (evicted first under kv_memory)."),
    "correction_rate": ("freekv_correction_rate",
                        "FreeKV: fraction of (layer, KV head) selections corrected with the fresh query."),
}
# scheduler stats field -> (counter name without `_total`, help); the server counts its own when absent
COUNTERS = {
    "prompt_tokens_total": ("prompt_tokens", "Prompt tokens of admitted requests."),
    "generation_tokens_total": ("generation_tokens", "Generated tokens."),
    "reused_prefix_tokens_total": ("reused_prefix_tokens", "Prompt tokens served from a cached prefix (multi-turn reuse) instead of prefilled."),
    "compactions_total": ("kv_compactions", "KV compactions run (KVCrush, SnapKV, H2O, StreamingLLM)."),
    "corrections_total": ("freekv_corrections", "FreeKV (layer, KV head) selections corrected with the fresh query."),
    "correction_checks_total": ("freekv_correction_checks", "FreeKV (layer, KV head) selections checked."),
    "requests_finished_total": ("requests_finished", "Requests the scheduler finished (any reason)."),
    "requests_cancelled_total": ("requests_cancelled", "Requests cancelled (client disconnects included)."),
}


class _SchedulerCollector:
    """Reads `llm.stats()` on each scrape."""

    def __init__(self, get_llm: Callable[[], Any], labels: dict[str, str], fallback: dict[str, float]):
        self.get_llm = get_llm
        self.labels = labels
        self.fallback = fallback

    def _stats(self):
        llm = self.get_llm()
        if llm is None or not hasattr(llm, "stats"):
            return None
        try:
            return llm.stats()
        except Exception:  # a scrape must never fail the endpoint
            return None

    def collect(self):
        stats = self._stats()
        names, values = list(self.labels), list(self.labels.values())
        for field, (name, doc) in GAUGES.items():
            value = getattr(stats, field, None) if stats is not None else None
            if field == "running" and value is not None:
                value += getattr(stats, "prefilling", 0) or 0  # vLLM counts prefilling requests as running
            if field == "correction_rate" and value is None:
                checks = getattr(stats, "correction_checks_total", None)
                if checks:
                    value = (getattr(stats, "corrections_total", 0) or 0) / checks
            if value is None and field in ("running", "waiting", "kv_bytes_used"):
                value = 0
            if value is None:
                continue
            gauge = GaugeMetricFamily(f"kvtrt:{name}", doc, labels=names)
            gauge.add_metric(values, float(value))
            yield gauge
        used = getattr(stats, "kv_bytes_used", None)
        cap = getattr(stats, "kv_bytes_cap", None)
        if used is not None and cap:
            gauge = GaugeMetricFamily("kvtrt:kv_cache_usage_perc", "KV bytes used / kv_memory cap (0..1).",
                                      labels=names)
            gauge.add_metric(values, float(used) / float(cap))
            yield gauge
        for field, (name, doc) in COUNTERS.items():
            value = getattr(stats, field, None) if stats is not None else None
            if value is None:
                value = self.fallback.get(field)
            if value is None:
                continue
            counter = CounterMetricFamily(f"kvtrt:{name}", doc, labels=names)
            counter.add_metric(values, float(value))
            yield counter


class ServerMetrics:
    """The metrics of one app. `observe(result)` after each finished request; `render()` for /metrics."""

    def __init__(self, get_llm: Callable[[], Any], model_name: str):
        self.registry = CollectorRegistry(auto_describe=False)
        labels = {"model_name": model_name}
        self._lock = threading.Lock()
        # used when the scheduler's stats lack a total (older runtimes): what this server saw
        self._fallback: dict[str, float] = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                                            "requests_finished_total": 0}
        self.registry.register(_SchedulerCollector(get_llm, labels, self._fallback))
        names = list(labels)
        kw = dict(labelnames=names, registry=self.registry)
        self.ttft = Histogram("kvtrt:time_to_first_token_seconds", "Time to first token (from submission).",
                              buckets=TTFT_BUCKETS, **kw).labels(**labels)
        self.itl = Histogram("kvtrt:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             buckets=ITL_BUCKETS, **kw).labels(**labels)
        self.e2e = Histogram("kvtrt:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, **kw).labels(**labels)
        self.queue = Histogram("kvtrt:request_queue_time_seconds", "Time a request waited for admission.",
                               buckets=TTFT_BUCKETS, **kw).labels(**labels)
        self.prompt_len = Histogram("kvtrt:request_prompt_tokens", "Prompt tokens per request.",
                                    buckets=TOKEN_BUCKETS, **kw).labels(**labels)
        self.gen_len = Histogram("kvtrt:request_generation_tokens", "Generated tokens per request.",
                                 buckets=TOKEN_BUCKETS, **kw).labels(**labels)
        self._success = Counter("kvtrt:request_success", "Requests answered, by finish reason.",
                                labelnames=names + ["finished_reason"], registry=self.registry)
        self._errors = Counter("kvtrt:request_errors", "Requests refused or failed, by HTTP status and code.",
                               labelnames=names + ["status", "code"], registry=self.registry)
        self._http_cancelled = Counter("kvtrt:requests_cancelled_by_client",
                                       "Requests cancelled because the client disconnected.",
                                       labelnames=names, registry=self.registry).labels(**labels)
        self._labels = labels

    def observe(self, result: Any) -> None:
        """Record a finished request (`GenerationResult`), reading its stats defensively."""
        stats = getattr(result, "stats", None)
        reason = _openai_reason(getattr(result, "finish_reason", "stop"))
        self._success.labels(**self._labels, finished_reason=reason).inc()
        prompt_tokens = len(getattr(result, "prompt_ids", ()) or ())
        new_tokens = len(getattr(result, "token_ids", ()) or ())
        with self._lock:
            self._fallback["prompt_tokens_total"] += prompt_tokens
            self._fallback["generation_tokens_total"] += new_tokens
            self._fallback["requests_finished_total"] += 1
        self.prompt_len.observe(prompt_tokens)
        self.gen_len.observe(new_tokens)
        if stats is None:
            return
        for attr, hist in (("ttft_s", self.ttft), ("e2e_s", self.e2e), ("queue_wait_s", self.queue)):
            value = getattr(stats, attr, None)
            if _finite(value):
                hist.observe(float(value))
        for gap in getattr(stats, "itl_s", None) or ():
            if _finite(gap):
                self.itl.observe(float(gap))

    def error(self, status: int, code: str | None) -> None:
        self._errors.labels(**self._labels, status=str(status), code=code or "").inc()

    def client_cancelled(self) -> None:
        self._http_cancelled.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _openai_reason(reason: str | None) -> str:
    """kvtrt's finish reasons in OpenAI's names: EOS and stop strings are both `stop`."""
    if reason in (None, "eos"):
        return "stop"
    return reason
