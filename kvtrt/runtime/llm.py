"""The embeddable API: `llm = kvtrt.load(dir); llm.generate(prompt)`, `llm.submit(prompt)` for services.

Every call goes through one scheduler (`scheduler.py`): `generate`, `stream` and `submit` are its
clients, so concurrent callers share one running batch.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Iterator, Sequence, Union

from ..contract import DEFAULT_PREFILL_CHUNK, GraphVariant
from ..manifest import Manifest
from .engine import OrtEngine
from .kv.policies import SnapKVPolicy
from .kv.spec import KVSpec, KVSpecError, parse_kv_spec
from .request import GenerationResult, Request, RequestStats
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerStats
from .scheduler import Sequence as _Sequence
from .tokenizer import Messages, TextCodec

Prompt = Union[str, Messages, Sequence[int]]

__all__ = ["LLM", "load", "GenerationResult", "RequestStats", "SchedulerStats", "PromptTooLongError", "parse_bytes"]


DEFAULTS = dict(max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, min_new_tokens=0)


def check_kv_spec(kv: KVSpec, manifest, graphs=None, inline: bool | None = None) -> None:
    """Refuse what the export's score outputs were not made for: another SnapKV observation window,
    or query-head signatures from per-KV-head scores; or a graph the engine lacks (`graphs`: the ones
    it can run, default the export's); or `select=inline` on an engine that cannot (`inline`: whether
    it can; None: not checked). The spec's own options were checked when it was parsed."""
    policy = kv.compaction
    if getattr(policy, "signature", None) == "query" and manifest.score_heads != "query":
        raise KVSpecError(f"kvcrush signature=query needs per-query-head scores, but this export's score outputs "
                          f"are per KV head (score_heads={manifest.score_heads!r}, an export made before "
                          f"--score-heads); re-export it (`kvtrt export {manifest.source} -o DIR`) or use "
                          f"signature=kv or signature=block")
    retrieval = kv.retrieval
    if retrieval is not None and retrieval.select == "fresh" and not manifest.decode_groups:
        raise KVSpecError(f"{retrieval.mode} select=fresh chooses each layer range's pages with the step's own "
                          f"query, which needs an export with decode groups; re-export with `kvtrt export "
                          f"{manifest.source} -o DIR --decode-groups {manifest.n_layers}` or use select=speculative")
    if retrieval is not None and retrieval.select == "inline" and retrieval.pool_dtype == "int8":
        raise KVSpecError(f"{retrieval.mode} select=inline recalls pages in C, which does not read "
                          f"pool_dtype=int8; use pool_dtype=fp16 or select=previous")
    if retrieval is not None and retrieval.select == "inline" and inline is False:
        raise KVSpecError(f"{retrieval.mode} select=inline re-selects pages inside kvtrt's decode attention op, which "
                          f"this engine does not run (it needs the ONNX Runtime CPU provider, a C compiler, "
                          f"KVTRT_DECODE_KERNEL and KVTRT_PAGE_OPS not 0, and on a CPU without AVX-512/AVX2 or a head "
                          f"size other than 64 `kvtrt.load(dir, decode_kernel=True)`); use select=auto")
    if retrieval is not None and retrieval.cover and (retrieval.select not in ("auto", "inline")
                                                      or retrieval.pool_dtype == "int8" or inline is False):
        engine = ", an engine without that op" if inline is False else ""
        raise KVSpecError(f"{retrieval.mode} cover={retrieval.cover} tests each head's best pages inside kvtrt's "
                          f"decode attention op (select=inline), which this request cannot use (select="
                          f"{retrieval.select}, pool_dtype={retrieval.pool_dtype}{engine}); use select=auto with "
                          f"pool_dtype=fp16 or fp32 on a CPU engine, or drop cover=")
    if policy is not None and policy.per_head_counts and GraphVariant.DECODE_HEADS not in (graphs or manifest.graphs):
        raise KVSpecError(f"{policy.name} keeps a different number of tokens per KV head, which decodes with the "
                          f"decode_heads graph; this export has none (it was made for TensorRT, which does not build "
                          f"that graph, or before it existed): use an ONNX Runtime export, or snapkv/kvcrush")
    base = getattr(policy, "base", policy)
    if isinstance(base, SnapKVPolicy) and policy.given("window") \
            and base.window != manifest.score_window:
        raise KVSpecError(f"snapkv window={base.window} differs from the export's --score-window "
                          f"{manifest.score_window}; use window={manifest.score_window} or re-export with "
                          f"--score-window {base.window}")


def decode_graphs(kv: KVSpec, manifest) -> list[str]:
    """The graphs a runtime with this KV spec loads up front: prefill and its decode variant. The
    full cache and retrieval views decode in place (`decode_shared`) when the export has that
    graph; compaction needs the decode graph's scores, per-head budgets (adakv) `decode_heads`. (A compacted cache too short to engage
    retrieval decodes with `decode`, loaded on first use.)"""
    shared = (kv.is_full or kv.retrieval is not None) and GraphVariant.DECODE_SHARED in manifest.graphs
    prefill = GraphVariant.PREFILL_SHARED if GraphVariant.PREFILL_SHARED in manifest.graphs else GraphVariant.PREFILL
    if kv.compaction is not None and kv.compaction.per_head_counts:  # per-head budgets: one slot pool per layer
        return [prefill, GraphVariant.DECODE_HEADS]
    return [prefill, GraphVariant.DECODE_SHARED if shared else GraphVariant.DECODE]


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens exceed the export's max positions."""


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_bytes(value: str | int | None) -> int | None:
    """`2GiB`, `512MiB`, `1.5GB` or a byte count -> bytes (None stays None: no cap)."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_memory={value!r} is not a size; write e.g. '2GiB', '512MiB' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class LLM:
    """A loaded export and its scheduler. Thread-safe: requests from any thread join one running
    batch."""

    def __init__(self, directory: str | os.PathLike, provider: str = "cpu", kv: str | KVSpec = "full",
                 threads: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, backend: str = "onnxruntime",
                 torch_threads: int | None = 1, kv_memory: str | int | None = None, max_queue: int | None = None,
                 max_batch: int = 32, prefix_cache: str | int = "512MiB", decode_kernel: bool | None = None):
        self.directory = directory
        self.manifest = Manifest.load(directory)
        self.kv = parse_kv_spec(kv)
        if backend == "onnxruntime":
            self.engine = OrtEngine(directory, self.manifest, provider=provider, threads=threads,
                                    variants=decode_graphs(self.kv, self.manifest), decode_kernel=decode_kernel)
        elif backend == "tensorrt":
            from .trt_engine import TrtEngine  # GPU only, `trt` extra

            self.engine = TrtEngine(directory, self.manifest)
        else:
            raise ValueError(f"backend {backend!r} is unknown; use 'onnxruntime' or 'tensorrt'")
        self.codec = TextCodec(directory, self.manifest)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._checked: set[KVSpec] = set()
        self._check(self.kv)
        self._ids = itertools.count()
        self.scheduler = Scheduler(self, kv_memory=parse_bytes(kv_memory), max_queue=max_queue, max_batch=max_batch,
                                   prefix_cache_bytes=parse_bytes(prefix_cache) or 0, torch_threads=torch_threads)

    def _check(self, kv: KVSpec) -> None:
        """Check a spec against the export once (its own options were checked when it was parsed)."""
        if kv not in self._checked:
            asks_inline = kv.retrieval is not None and (kv.retrieval.select == "inline" or bool(kv.retrieval.cover))
            check_kv_spec(kv, self.manifest, getattr(self.engine, "engines", None),  # TensorRT: the engines built
                          inline=getattr(self.engine, "refreshes_inline", False) if asks_inline else None)
            self._checked.add(kv)

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: text (chat-templated when `chat`), messages, or ids."""
        if isinstance(prompt, str):
            return self.codec.encode_chat([{"role": "user", "content": prompt}]) if chat else self.codec.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.codec.encode_chat(list(prompt))
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < self.manifest.vocab_size for t in ids):
            raise ValueError(f"token ids must be in [0, {self.manifest.vocab_size})")
        return ids

    def _fit(self, ids: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        limit = self.manifest.max_positions
        if not ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens >= limit:
            raise PromptTooLongError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                     f"{limit} positions; ask for fewer new tokens")
        if len(ids) + max_new_tokens > limit:
            if not truncate:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the export's {limit} "
                    f"positions; shorten the prompt, lower max_new_tokens, or pass truncate=True (--truncate) "
                    f"to keep the last {limit - max_new_tokens} prompt tokens")
            ids = ids[len(ids) + max_new_tokens - limit:]
        return ids

    # -- generation ------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop: Sequence[str] = (),
               repetition_penalty: float | None = None, min_new_tokens: int | None = None,
               logprobs: int | None = None, ignore_eos: bool = False, chat: bool | None = None,
               kv: str | KVSpec | None = None, truncate: bool = False, progress: bool = False) -> Request:
        """Queue one request and return at once; iterate the returned `Request` for text pieces,
        `result()` for the `GenerationResult`, `cancel()` to end it.

        `prompt` is text, chat messages or token ids; `chat=True` wraps text in the chat template.
        Options left None take the export's generation_config defaults, then greedy decoding of 128
        tokens. temperature 0 is greedy; repetition_penalty and min_new_tokens as in HF `generate`;
        `logprobs=n` returns each token's log-probability and the n most likely (`result.logprobs`);
        `ignore_eos` decodes past EOS (benchmarks). It ends at EOS or a `stop` string (finish_reason
        "stop"), after `max_new_tokens` ("length"), or when cancelled. `kv` overrides the load's KV
        spec for this request; `progress` shows a bar while a long prompt is prefilled. Raises
        `PromptTooLongError`, `KVSpecError`, `KVMemoryError` (can never fit under `kv_memory`) or
        `QueueFullError` (`max_queue` requests already waiting)."""
        seq = self._sequence(prompt, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, repetition_penalty=repetition_penalty,
                                          min_new_tokens=min_new_tokens), seed=seed, stop=stop, logprobs=logprobs,
                             ignore_eos=ignore_eos, chat=chat, kv=kv, truncate=truncate, progress=progress)
        return self.scheduler.submit(seq)

    def _sequence(self, prompt: Prompt, options: dict, seed: int = 0, stop: Sequence[str] = (),
                  logprobs: int | None = None, ignore_eos: bool = False, chat: bool | None = None,
                  kv: str | KVSpec | None = None, truncate: bool = False, progress: bool = False) -> _Sequence:
        """A scheduler sequence for `prompt`: options resolved, prompt fitted, spec checked."""
        given = {k: v for k, v in options.items() if v is not None}
        o = {**DEFAULTS, **self.manifest.generation_defaults, **given}
        spec = self.kv if kv is None else parse_kv_spec(kv)
        self._check(spec)
        ids = self._fit(self.encode(prompt, chat), o["max_new_tokens"], truncate)
        if spec.compaction is not None:
            spec.compaction.budget_tokens(len(ids))  # a budget that cannot hold sink + window fails here, not mid-run
        sampling = SamplingParams(o["temperature"], o["top_k"], o["top_p"], seed, o["repetition_penalty"],
                                  o["min_new_tokens"], logprobs)
        stop = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)
        eos = set() if ignore_eos else set(self.manifest.eos_token_ids)
        return _Sequence(Request(next(self._ids), ids), ids, o["max_new_tokens"], sampling, stop, spec, self.codec,
                         eos, progress=progress)

    def generate(self, prompt: Prompt | list[Prompt], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop: Sequence[str] = (), repetition_penalty: float | None = None,
                 min_new_tokens: int | None = None, logprobs: int | None = None, ignore_eos: bool = False,
                 chat: bool | None = None, kv: str | KVSpec | None = None, truncate: bool = False,
                 progress: bool = False) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt, or for a list of prompts (a list of results; they decode in
        one running batch). Options as in `submit`."""
        batched = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], (dict, int))
        prompts = list(prompt) if batched else [prompt]
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop=stop, repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                       logprobs=logprobs, ignore_eos=ignore_eos, chat=chat, kv=kv, truncate=truncate,
                       progress=progress)
        requests = [self.submit(p, **options) for p in prompts]
        results = [request.result() for request in requests]
        return results if batched else results[0]

    def stream(self, prompt: Prompt, *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop: Sequence[str] = (),
               repetition_penalty: float | None = None, min_new_tokens: int | None = None, ignore_eos: bool = False,
               chat: bool | None = None, kv: str | KVSpec | None = None, truncate: bool = False,
               progress: bool = False) -> Iterator[str]:
        """Yield text pieces as they decode (one prompt). After the loop, `self.last_stats` holds
        the request's stats (per LLM: with several threads, use `submit(...).result().stats`)."""
        request = self.submit(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stop=stop, repetition_penalty=repetition_penalty,
                              min_new_tokens=min_new_tokens, ignore_eos=ignore_eos, chat=chat, kv=kv,
                              truncate=truncate, progress=progress)
        try:
            yield from request
        finally:
            if not request.done:
                request.cancel()
        self.last_stats = request.result().stats

    def stats(self) -> SchedulerStats:
        """The scheduler's gauges and counters: running, waiting, KV bytes used and cap, ..."""
        return self.scheduler.stats()

    def request_bytes(self, prompt: Prompt, max_new_tokens: int | None = None, kv: str | KVSpec | None = None,
                      chat: bool | None = None) -> int:
        """The worst-case KV bytes one request needs alone: what admission under `kv_memory` counts."""
        seq = self._sequence(prompt, dict(max_new_tokens=max_new_tokens), chat=chat, kv=kv)
        return self.scheduler.worst_case_bytes(seq, alone=True)

    def close(self, timeout: float | None = None) -> None:
        """Finish the running requests, fail the waiting ones, stop the scheduler thread."""
        self.scheduler.close(timeout)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(directory: str | os.PathLike, provider: str = "cpu", kv: str | KVSpec = "full", threads: int | None = None,
         prefill_chunk: int = DEFAULT_PREFILL_CHUNK, backend: str = "onnxruntime", torch_threads: int | None = 1,
         kv_memory: str | int | None = None, max_queue: int | None = None, max_batch: int = 32,
         prefix_cache: str | int = "512MiB", decode_kernel: bool | None = None) -> LLM:
    """Load an export folder made by `kvtrt export`.

    provider: "cpu", "cuda" or "tensorrt" (ONNX Runtime execution provider); kv: the default KV spec
    (see the README; `submit(kv=...)` overrides it per request); threads: engine intra-op threads
    (default all cores); prefill_chunk: prompt tokens per prefill call (and per scheduler iteration
    while other requests decode); torch_threads: torch threads of the KV manager's own threads on a
    GPU engine (the scheduler's and FreeKV's worker: its ops are small, and more threads beside the
    engine's oversubscribe the cores; None: torch's default; a CPU runtime does not use torch); the
    process's torch setting is left alone.
    kv_memory: cap on the KV bytes of all requests together ("2GiB"; None: no cap), requests wait in FIFO order until theirs fits; max_queue: waiting requests before
    `submit` raises `QueueFullError` (None: unbounded); max_batch: sequences per decode call;
    prefix_cache: bytes of finished conversations kept so a next turn prefills only what is new
    (0: off; under kv_memory they are evicted first); decode_kernel: decode attention with kvtrt's own
    CPU kernel (None: where it has a vector path, unless `KVTRT_DECODE_KERNEL=0`; False: ONNX Runtime's
    GroupQueryAttention; True: the kernel or an error saying why not; `llm.engine.decode_attention`
    says which runs)."""
    return LLM(directory, provider=provider, kv=kv, threads=threads, prefill_chunk=prefill_chunk, backend=backend,
               torch_threads=torch_threads, kv_memory=kv_memory, max_queue=max_queue, max_batch=max_batch,
               prefix_cache=prefix_cache, decode_kernel=decode_kernel)
