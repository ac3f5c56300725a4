"""One scheduler thread owns the engine and runs one loop over every request (continuous batching):

    while running:
        admit waiting requests (FIFO) whose worst-case KV fits under kv_memory; reuse a cached prefix
        spend this iteration's prefill token budget on a chunk of the admitted prompt
        one decode call per decode group (all rows of a group at once), then per sequence:
            choose the next token, stream its text, retire it at EOS / stop / length / cancel

Sequences join a decode group after their prefill and leave it when they end, their KV freed at
once (`batch.py` says how rows of different lengths share one call). Finished full-cache and
compacted sequences leave their KV in an LRU prefix cache inside `kv_memory`, so a chat's next turn
prefills only what is new.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from .arrays import host
from .batch import DenseBatch
from .head_pool_batch import HeadPoolBatch
from .retrieval_batch import RetrievalGroup
from .kv.spec import KVSpec
from .kv.store import KVStore
from .prefill import PrefillJob
from .request import GenerationResult, KVMemoryError, QueueFullError, Request, RequestStats
from .sampling import Sampler, SamplingParams
from .detokenize import StopMatcher, StreamDecoder


@dataclass
class SchedulerStats:
    """Gauges and counters of a running scheduler (what `kvtrt serve` exports as metrics)."""

    running: int = 0  # sequences decoding
    prefilling: int = 0  # admitted, prompt being prefilled
    waiting: int = 0  # submitted, not admitted yet
    kv_bytes_used: int = 0  # KV bytes of live requests: decode batches, FreeKV pools and views, prefills
    kv_bytes_cap: int | None = None
    cached_prefixes: int = 0
    cached_prefix_bytes: int = 0  # finished conversations kept for a next turn (evicted first under kv_memory)
    reused_prefix_tokens_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    compactions_total: int = 0
    requests_finished_total: int = 0
    requests_cancelled_total: int = 0
    corrections_total: int = 0  # FreeKV heads corrected, over finished requests
    correction_checks_total: int = 0  # FreeKV heads checked, over finished requests


IDLE_EXIT_S = 1.0  # an idle scheduler thread ends after this long


class Sequence:
    """A request inside the scheduler: its prompt, KV spec, sampler, output so far and stats."""

    def __init__(self, request: Request, ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                 stop: tuple[str, ...], spec: KVSpec, codec, eos: set[int], progress: bool = False):
        self.request, self.ids, self.max_new_tokens = request, ids, max_new_tokens
        self.sampler = Sampler(sampling)
        self.seen = None  # prompt + output ids as a [V] mask, for the repetition penalty
        self.logprobs: list | None = [] if sampling.logprobs is not None else None
        # evaluation hooks: tokens fed instead of sampled (their log-probs recorded), every step's
        # logits kept, a prefill to start from (store, logits, query) instead of running one
        self.forced: list[int] | None = None
        self.kept_logits: list[np.ndarray] | None = None
        self.prefilled: tuple | None = None
        self.cache = True  # leave the KV in the prefix cache when done
        self.stop, self.spec, self.eos = stop, spec, eos
        self.policy, self.retrieval = spec.compaction, spec.retrieval
        self.keep = self.policy.budget_tokens(len(ids)) if self.policy is not None else None
        self.decoder, self.matcher = StreamDecoder(codec), StopMatcher(stop)
        self.generated: list[int] = []
        self.pending = -1  # the next input token
        self.position = len(ids)
        self.text = ""  # the text streamed so far (a possible start of a stop string is held back)
        self.finish_reason: str | None = None
        self.stats = RequestStats(prompt_tokens=len(ids))
        self.held = 0  # most slots this sequence held in a dense batch
        self.job: PrefillJob | None = None
        self.manager = None  # FreeKV / Quest: the retrieval manager, made before the prefill
        self.progress, self.bar = progress, None  # a prefill progress bar, when asked for
        self.group = None
        self.submitted = time.perf_counter()
        self.admitted = self.first = self.joined = 0.0  # joined: in a decode group (FreeKV: pool built)

    @property
    def remaining(self) -> int:
        """Decode steps still to come at most."""
        return self.max_new_tokens - len(self.generated)


class Scheduler:
    """Requests in, one running batch out. `submit` is thread-safe and returns at once."""

    def __init__(self, llm, kv_memory: int | None, max_queue: int | None, max_batch: int = 32,
                 prefill_budget: int | None = None, prefix_cache_bytes: int = 0, torch_threads: int | None = None):
        self.llm, self.engine, self.m = llm, llm.engine, llm.manifest
        self.kv_memory, self.max_queue, self.max_batch = kv_memory, max_queue, max_batch
        self.prefill_budget = prefill_budget or llm.prefill_chunk  # prompt tokens per loop iteration
        self.torch_threads = torch_threads  # set in the scheduler thread only (OpenMP's count is per thread)
        self.prefix_cache_bytes = prefix_cache_bytes  # finished conversations kept for a next turn
        self.use_prefix_cache = prefix_cache_bytes > 0
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.dense = DenseBatch(self.engine, scored=False, max_rows=max_batch)
        self.scored = DenseBatch(self.engine, scored=True, max_rows=max_batch)
        self.head_pool = HeadPoolBatch(self.engine, max_rows=max_batch)  # per-head budgets (adakv)
        self.retrieval = RetrievalGroup(self.engine)
        self.dense_groups = (self.dense, self.scored, self.head_pool)
        self.groups = (*self.dense_groups, self.retrieval)
        self.prefixes: OrderedDict[int, tuple[list[int], KVStore, KVSpec]] = OrderedDict()
        self.counters = SchedulerStats(kv_bytes_cap=kv_memory)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._gauges: dict = {}
        _LIVE.add(self)

    # -- the client side ---------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Request:
        need = self.worst_case_bytes(seq, alone=True)
        if self.kv_memory is not None and need > self.kv_memory:
            raise KVMemoryError(
                f"this request needs up to {need / 2**20:.1f} MiB of KV ({len(seq.ids)} prompt + {seq.max_new_tokens} "
                f"new tokens, kv={seq.spec}) but kv_memory is {self.kv_memory / 2**20:.1f} MiB; raise kv_memory, "
                f"lower max_new_tokens, shorten the prompt, or use a compacting KV spec (e.g. kv='kvcrush:budget=0.25')")
        with self._lock:
            if self._stopping:
                raise RuntimeError("the scheduler is closed; load the model again")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue}); "
                                     f"retry later or load with a larger max_queue")
            seq.request._scheduler = self
            self.waiting.append(seq)
            self._ensure_thread()
            self._lock.notify_all()
        return seq.request

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def stats(self) -> SchedulerStats:
        with self._lock:
            s = SchedulerStats(**{**vars(self.counters), **self._gauges})
            s.prefilling, s.waiting = len(self.prefilling), len(self.waiting)
            return s

    def close(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Stop after the running requests finish (or, with `cancel`, cancel them); waiting ones
        are failed."""
        with self._lock:
            self._stopping = True
            if cancel:
                for seq in [*self.prefilling, *(r.seq for g in self.groups for r in g.rows)]:
                    seq.request.cancelled = True
            for seq in self.waiting:
                seq.request._fail(RuntimeError("the scheduler was closed before this request started"))
            self.waiting.clear()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="kvtrt-scheduler", daemon=True)
            self._thread.start()

    # -- memory ------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """KV bytes that live requests hold now (the prefix cache apart)."""
        prefill = sum(s.job.store.nbytes for s in self.prefilling if s.job is not None)
        return sum(g.nbytes for g in self.groups) + prefill

    def worst_case_bytes(self, seq: Sequence, alone: bool = False) -> int:
        """KV bytes the whole runtime may hold once `seq` is admitted (with `alone`, as if it were the
        only request): its prefill store, plus every decode group's bound with `seq` in it."""
        bpt = self.m.kv_bytes_per_token
        n, rest = len(seq.ids), seq.max_new_tokens
        prefill = n * (bpt + (4 * self.m.score_rows * self.m.n_layers if seq.policy is not None else 0))
        extent, group = self._placement(seq)
        total = prefill
        for g in self.dense_groups:
            rows = []
            if not alone:
                rows = [(self._placement(r.seq)[0] if g.scored else r.length, r.seq.remaining) for r in g.rows]
                rows += [(self._placement(s)[0], s.max_new_tokens) for s in self.prefilling if self._placement(s)[1] is g]
            if group is g:
                rows.append((extent, rest))
            if rows:
                total += g.bound(rows, current=not alone)
        if group is self.retrieval:
            total += self._retrieval_bytes(seq)
        if not alone:
            total += self.retrieval.nbytes + sum(self._retrieval_bytes(s) for s in self.prefilling
                                                 if self._placement(s)[1] is self.retrieval)
        return total

    def _placement(self, seq: Sequence) -> tuple[int, object]:
        """(slots the sequence occupies in its group, the group) when it decodes."""
        n = len(seq.ids)
        stored = min(seq.keep, n) if seq.policy is not None else n
        if seq.retrieval is not None and seq.retrieval.engages(stored):
            return stored, self.retrieval
        if seq.policy is not None:
            return seq.keep + seq.policy.slack, self.head_pool if seq.policy.per_head_counts else self.scored
        return n, self.dense

    def _retrieval_bytes(self, seq: Sequence) -> int:
        """FreeKV / Quest: the page pool for the whole sequence, its summaries and its views (two, or one
        with ``select=inline|fresh|previous``)."""
        cfg, bpt = seq.retrieval, self.m.kv_bytes_per_token
        stored = min(seq.keep, len(seq.ids)) if seq.policy is not None else len(seq.ids)
        tokens = stored + seq.max_new_tokens + cfg.page
        inline = getattr(self.engine, "refreshes_inline", False)
        views = cfg.views(self.m, cpu=self.engine.device == "cpu", inline=inline)
        return (tokens + tokens // cfg.page + views * (cfg.slots(stored) + 1)) * bpt

    def _admissible(self, seq: Sequence) -> bool:
        if self.kv_memory is None:
            return True
        while True:
            if self.worst_case_bytes(seq) + self._cached_bytes() <= self.kv_memory:
                return True
            if not self.prefixes:
                return False
            self._evict_prefix()

    def _cached_bytes(self) -> int:
        return sum(store.nbytes for _, store, _ in self.prefixes.values())

    # -- the loop ----------------------------------------------------------------------------
    def _scope_torch_threads(self) -> bool:
        """Once torch is imported (a GPU engine, or the caller's own use), this thread's torch thread
        count is `torch_threads` (True when that is done; a CPU runtime never imports torch)."""
        if self.torch_threads is None:
            return True
        if sys.modules.get("torch") is None:  # not imported (or blocked: None)
            return False
        sys.modules["torch"].set_num_threads(self.torch_threads)
        return True

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as error:  # a fault of the loop itself: what is in flight fails, it never hangs
            traceback.print_exc()
            self._fail_in_flight(error)
            with self._lock:  # requests submitted meanwhile get a new loop (this thread still counted as alive)
                self._thread = None
                if self.waiting and not self._stopping:
                    self._ensure_thread()

    def _fail_in_flight(self, error: Exception) -> None:
        """Fail every request this loop holds (waiting, prefilling, decoding) with `error` and free its KV."""
        with self._lock:
            seqs = list(self.waiting) + list(self.prefilling)
            self.waiting.clear()
            self.prefilling.clear()
        for group in self.groups:
            for row in list(group.rows):
                seqs.append(row.seq)
                with contextlib.suppress(Exception):
                    group.leave(row.seq)
        for seq in seqs:
            seq.job = None
            with contextlib.suppress(Exception):
                self._release_manager(seq)
            if not seq.request.done:
                seq.request._fail(RuntimeError(f"the request was stopped by an internal error of kvtrt's "
                                               f"scheduler: {error!r}"))
        with contextlib.suppress(Exception):
            self._publish()

    def _serve(self) -> None:
        torch_scoped = False
        while True:
            with self._lock:
                while not (self.waiting or self.prefilling or self._running()) and not self._stopping:
                    if not self._lock.wait(IDLE_EXIT_S) and not (self.waiting or self.prefilling or self._running()):
                        # idle: the thread ends (the next submit starts another), so an LLM nobody
                        # holds any more is not kept alive by its own scheduler thread
                        self._thread = None
                        return
                if self._stopping and not (self.prefilling or self._running()):
                    return
                self._admit()
            self._cancel_requested()
            torch_scoped = torch_scoped or self._scope_torch_threads()
            self._prefill()
            for group in self.groups:
                if group.rows:
                    try:
                        self._decode(group)
                    except Exception as error:  # a failed call fails the rows it served; the loop goes on
                        traceback.print_exc()
                        for row in list(group.rows):
                            group.leave(row.seq)
                            row.seq.request._fail(error)
            self._publish()

    def _publish(self) -> None:
        """Gauges for `stats()`, computed on this thread (it alone changes the groups)."""
        gauges = dict(running=sum(len(g.rows) for g in self.groups), kv_bytes_used=self.used_bytes(),
                      cached_prefixes=len(self.prefixes), cached_prefix_bytes=self._cached_bytes())
        with self._lock:
            self._gauges = gauges

    def _running(self) -> bool:
        return any(g.rows for g in self.groups)

    def _admit(self) -> None:
        """FIFO: the head of the queue starts its prefill when its worst case fits."""
        while self.waiting and not self.prefilling:
            seq = self.waiting[0]
            if seq.request.cancelled:
                self.waiting.popleft()
                self._end(seq, "cancelled")
                continue
            if not self._admissible(seq):
                return
            self.waiting.popleft()
            seq.admitted = time.perf_counter()
            seq.stats.queue_wait_s = seq.admitted - seq.submitted
            try:
                self._start_prefill(seq)
            except Exception as error:  # fails this request only (the loop and the queue go on)
                traceback.print_exc()
                seq.job = None
                self._release_manager(seq)
                seq.request._fail(error)
                continue
            self.prefilling.append(seq)

    def _start_prefill(self, seq: Sequence) -> None:
        if seq.prefilled is not None:
            self.counters.prompt_tokens_total += len(seq.ids)
            return
        track = seq.policy is not None
        start, store = self._reuse_prefix(seq) if self.use_prefix_cache else (0, None)
        seq.stats.reused_prefix_tokens = start
        self.counters.reused_prefix_tokens_total += start
        self.counters.prompt_tokens_total += len(seq.ids)
        on_chunk = None
        if seq.policy is None and self._placement(seq)[1] is self.retrieval:
            seq.manager = self.retrieval.create_manager(seq, len(seq.ids))
            if self.retrieval.summarize_in_prefill:  # the pool's page summaries as the prefill writes each chunk
                seq.manager.begin(len(seq.ids), reserve_tokens=seq.max_new_tokens + 1)
                on_chunk = self.retrieval.absorber(seq.manager)
        seq.job = PrefillJob(self.engine, seq.ids, self.llm.prefill_chunk, track_scores=track, start=start, store=store,
                             on_chunk=on_chunk)
        if seq.progress and len(seq.job.chunks) > 1:
            from tqdm.auto import tqdm

            seq.bar = tqdm(total=seq.job.remaining_tokens, desc="prefill", unit="tok")

    def _prefill(self) -> None:
        budget = self.prefill_budget if self._running() else float("inf")
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            if seq.request.cancelled:
                self._drop_prefill(seq, "cancelled")
                continue
            try:
                if seq.prefilled is not None:
                    self.prefilling.popleft()
                    self._first_token(seq, *seq.prefilled)
                    seq.prefilled = None
                    continue
                done = seq.job.step()
                budget -= done
                if seq.bar is not None:
                    seq.bar.update(done)
                if seq.job.done:
                    self.prefilling.popleft()
                    job, seq.job = seq.job, None
                    self._first_token(seq, job.store, job.logits, job.query)
            except Exception as error:  # fails this request only
                traceback.print_exc()
                if seq in self.prefilling:
                    self.prefilling.remove(seq)
                seq.job = None
                self._release_manager(seq)
                seq.request._fail(error)

    def _drop_prefill(self, seq: Sequence, reason: str) -> None:
        with self._lock:
            self.prefilling.remove(seq)
        seq.job = None
        self._end(seq, reason)

    def _first_token(self, seq: Sequence, store: KVStore, logits, query: list) -> None:
        """The prompt is in `store`: compact it, choose the first token, join a decode group."""
        if seq.bar is not None:
            seq.bar.close()
        if seq.policy is not None and store.length > seq.keep and not seq.policy.per_head_counts:
            self._compact_store(seq, store)  # (per-head budgets are allocated as the row joins its group)
        seq.stats.prefill_s = time.perf_counter() - seq.admitted
        if self._choose(seq, logits[0]):
            pooled = seq.policy is not None and seq.policy.per_head_counts  # (its store is not compacted yet)
            self._end(seq, seq.finish_reason, store=store if seq.retrieval is None and seq.cache and not pooled else None)
            return
        if seq.retrieval is not None and seq.retrieval.engages(store.length):
            group = self.retrieval
            group.join(seq, store, query, seq.manager)
            seq.manager = None
        else:
            if seq.retrieval is not None:  # short cache: dense decode, said in the stats
                seq.stats.kv = {"retrieval_engaged": 0, "retrieval_min_context": seq.retrieval.threshold(store.length)}
            group = self.dense if seq.policy is None else self.head_pool if seq.policy.per_head_counts else self.scored
            group.join(seq, store)
        seq.group = group
        seq.joined = time.perf_counter()

    def _compact_store(self, seq: Sequence, store: KVStore) -> None:
        """Shrink a single-sequence store to the sequence's budget (per layer, per KV head)."""
        a = store.arrays
        live = a.nonzero(store.mask[0])
        count = min(seq.keep, len(live))
        # the policy computes in numpy on the host (a GPU store's scores are copied there); picks come back here
        slots = [live[a.asarray(seq.policy.select(store.grouped_scores(layer)[..., live], count))][None]
                 for layer in range(self.m.n_layers)]
        store.compact(slots, [count], 0)
        seq.stats.compactions += 1

    def _decode(self, group) -> None:
        for seq, logits in group.step():
            seq.stats.decode_steps += 1
            seq.position += 1
            if self._choose(seq, logits):
                store = self._extract(group, seq) if self._cacheable(seq) else None
                group.leave(seq)
                self._end(seq, seq.finish_reason, store=store)

    def _choose(self, seq: Sequence, logits) -> bool:
        """Pick, record and stream the next token from `logits` [V] (an engine array); True when the
        sequence is finished."""
        logits = host(logits)
        if seq.kept_logits is not None:
            seq.kept_logits.append(logits.copy())
        params = seq.sampler.params
        if seq.forced is not None:
            token = seq.forced[len(seq.generated)]
            info = seq.sampler.logprobs(logits, token)
        elif params.repetition_penalty == 1.0 and params.logprobs is None and params.min_new_tokens == 0:
            token, info = int(seq.sampler(logits[None])[0]), None
        else:
            if params.repetition_penalty != 1.0 and seq.seen is None:
                seq.seen = np.zeros(logits.shape[-1], dtype=bool)
                seq.seen[np.asarray(seq.ids + seq.generated, dtype=np.int64)] = True
            token, info = seq.sampler.choose(logits, seq.seen if seq.seen is not None else (), len(seq.generated),
                                             list(seq.eos))
        if seq.seen is not None:
            seq.seen[token] = True
        if seq.logprobs is not None:
            seq.logprobs.append(info)
        now = time.perf_counter()
        if seq.first == 0.0:
            seq.first = now
            seq.stats.ttft_s = now - seq.submitted
        if token in seq.eos:
            seq.finish_reason = "stop"
            return True
        seq.stats.token_times.append(now)  # output tokens only (an EOS is not one)
        self.counters.generation_tokens_total += 1
        seq.generated.append(token)
        seq.stats.new_tokens = len(seq.generated)
        if self._stream(seq, seq.decoder.push(token)):
            seq.finish_reason = "stop"
            return True
        if seq.request.cancelled:
            seq.finish_reason = "cancelled"
            return True
        if len(seq.generated) >= seq.max_new_tokens:
            seq.finish_reason = "length"
            return True
        seq.pending = token
        return False

    @staticmethod
    def _stream(seq: Sequence, text: str) -> bool:
        """Stream the part of `text` no stop string can claim; True when a stop string was hit."""
        emit, stopped = seq.matcher.feed(text)
        seq.text += emit
        seq.request._push(emit)
        return stopped

    @staticmethod
    def _release_manager(seq: Sequence) -> None:
        """A retrieval manager made for the prefill that never joined a decode group."""
        if seq.manager is not None:
            seq.manager.close()
            seq.manager = None

    def _end(self, seq: Sequence, reason: str, store: KVStore | None = None) -> None:
        """Finish a sequence: flush its text, cache its KV for a next turn, publish its result."""
        self._release_manager(seq)
        if not seq.matcher.stopped and reason != "cancelled":
            self._stream(seq, seq.decoder.flush())
            tail = seq.matcher.flush()
            seq.text += tail
            seq.request._push(tail)
        if store is not None and reason != "cancelled" and self.use_prefix_cache:
            self._cache_prefix(seq, store)
        now = time.perf_counter()
        st = seq.stats
        st.decode_s = now - seq.joined if seq.joined else 0.0  # the decode steps, not a pool build
        st.e2e_s = now - seq.submitted
        st.submitted_at, st.admitted_at, st.finished_at = seq.submitted, seq.admitted, now
        bpt = self.m.kv_bytes_per_token
        st.kv_bytes = max(st.kv_bytes, seq.held * bpt)
        st.kv_full_bytes = (len(seq.ids) + len(seq.generated)) * bpt
        self.counters.compactions_total += st.compactions
        self.counters.requests_finished_total += 1
        if reason == "cancelled":
            self.counters.requests_cancelled_total += 1
        self.counters.corrections_total += int(st.kv.get("heads_corrected", 0))
        self.counters.correction_checks_total += int(st.kv.get("heads_checked", 0))
        self._publish()  # the gauges a caller reads right after its result are current
        seq.request._finish(GenerationResult(seq.text, list(seq.generated), seq.ids, reason, st, seq.logprobs))

    def _cancel_requested(self) -> None:
        for group in self.groups:
            for row in list(group.rows):
                if row.seq.request.cancelled:
                    group.leave(row.seq)
                    self._end(row.seq, "cancelled")
        with self._lock:
            for seq in [s for s in self.waiting if s.request.cancelled]:
                self.waiting.remove(seq)
                self._end(seq, "cancelled")

    # -- multi-turn reuse --------------------------------------------------------------------
    def _cacheable(self, seq: Sequence) -> bool:
        """Dense rows leave their KV for a next turn (a FreeKV pool is not kept)."""
        return self.use_prefix_cache and seq.cache and seq.group in (self.dense, self.scored)

    def _extract(self, group: DenseBatch, seq: Sequence) -> KVStore:
        """A single-sequence copy of `seq`'s row (its live span)."""
        i = next(i for i, r in enumerate(group.rows) if r.seq is seq)
        row = group.rows[i]
        span = row.length
        store = KVStore(self.m.n_layers, 1, self.m.n_kv_heads, self.m.head_dim, self.engine.dtype, self.engine.arrays,
                        capacity=span, track_scores=group.scored, score_rows=self.m.score_rows)
        for dst, src in zip(store._tensors(), group._tensors()):
            for d, s in zip(dst, src):
                d[0] = s[i, :, :span]
        store.mask[0] = 1
        store.length = span
        return store

    def _cache_prefix(self, seq: Sequence, store: KVStore) -> None:
        fed = seq.ids + seq.generated[:-1] if seq.generated else list(seq.ids)
        if store.length == 0 or (seq.policy is None and store.length != len(fed)):
            return
        self.prefixes[seq.request.id] = (fed, store, seq.spec)
        while self.prefixes and (self._cached_bytes() > self.prefix_cache_bytes or (
                self.kv_memory is not None and self.used_bytes() + self._cached_bytes() > self.kv_memory)):
            self._evict_prefix()

    def _evict_prefix(self) -> None:
        self.prefixes.popitem(last=False)

    def _reuse_prefix(self, seq: Sequence) -> tuple[int, KVStore | None]:
        """The longest cached conversation that `seq`'s prompt continues (same KV spec), taken out of
        the cache: (tokens reused, its store), or (0, None)."""
        best, best_key = 0, None
        for key, (fed, _, spec) in self.prefixes.items():
            if spec != seq.spec:
                continue
            shared = _common_prefix(fed, seq.ids[:-1])  # at least one prompt token is prefilled (its logits)
            if seq.policy is not None and shared < len(fed):
                continue  # a compacted cache holds chosen slots of the whole conversation: all or nothing
            if shared > best:
                best, best_key = shared, key
        if best_key is None:
            return 0, None
        _, store, _ = self.prefixes.pop(best_key)
        if best < store.length:  # full cache: slot i holds position i, keep the shared prefix
            store.mask[:, best:] = 0
            store.length = best
        return best, store


_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, end every scheduler thread before the engines are torn down."""
    for scheduler in list(_LIVE):
        scheduler.close(timeout=10, cancel=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
