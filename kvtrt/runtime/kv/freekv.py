"""FreeKV / Quest retrieval between decode steps: the recall and correction manager.

Design, usage, the view layout and the speculative recall with correction: ``docs/freekv.md``.
Arrays are numpy on the CPU (torch is never imported there) and torch tensors on a CUDA device
(``backend.py``); inputs on the CPU may be either.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..cpu_kernels import page_ops
from ..memory import return_freed_memory
from .backend import backend_for
from .options import KVSpecError
from .page_select import CRITICAL_PATH_THREADS
from .pages import PagePool, Tensor
from .stats import RetrievalStats
from .views import KVView

if TYPE_CHECKING:
    from .retrieval import RetrievalConfig


class _Placement(NamedTuple):
    """Where a recall puts the pages a view lacks: per missing page its (layer, sequence, KV head),
    page slot and page id (sorted by layer), and the view's new slot-to-page map."""

    layers: Tensor
    seqs: Tensor
    heads: Tensor
    slots: Tensor
    pages: Tensor
    slot_pages: Tensor
    selected: int
    hits: int


class FreeKVRetrieval:
    """Retrieval state of one batch of sequences: host page pool, sink + ring master copy, two views
    that alternate between steps, and the worker that prepares the next one.

    Built by ``RetrievalConfig.create``. ``device``: "cpu" (numpy arrays) or a CUDA device (torch
    tensors); ``backend`` overrides the choice (``backend.TorchBackend("cpu")`` runs the GPU code path
    on the CPU); ``dtype``/``mask_dtype``: the KV's and the graph's ``past_mask`` dtypes (numpy or
    torch dtypes, or names); ``max_context`` resolves a fractional budget; ``threaded=False``
    prepares the next view inline in ``prefetch()`` (same results, no overlap); ``staging_slot`` adds
    the in-place graph's ``write_slot`` after each view.
    """

    def __init__(
        self,
        config: RetrievalConfig,
        n_layers: int,
        n_kv_heads: int,
        n_heads: int,
        head_dim: int,
        batch: int = 1,
        dtype=None,
        *,
        device="cpu",
        mask_dtype=None,
        max_context: int | None = None,
        threaded: bool = True,
        staging_slot: bool = False,
        backend=None,
    ) -> None:
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.config, self.mode = config, config.mode
        self.n_layers, self.n_kv_heads, self.n_heads, self.head_dim = n_layers, n_kv_heads, n_heads, head_dim
        self.xp = xp = backend if backend is not None else backend_for(device)
        dtype = xp.dtype("float32" if dtype is None else dtype)
        mask_dtype = xp.dtype("bool" if mask_dtype is None else mask_dtype)
        self.batch, self.dtype, self.device = batch, dtype, xp.device
        self.layout = lay = config.layout(max_context, staging_slot)
        self.budget = config.budget_tokens(max_context)
        self.config, self.combine, self.drift = config, config.combine, config.drift
        self.tau, self.cover = config.correction(inline=False)  # the Python paths' (inline: `_inline_context`)
        self.pool_dtype = config.pool_dtype
        if self.pool_dtype == "int8" and xp.is_cuda:
            raise KVSpecError(f"{config.mode}: pool_dtype=int8 dequantizes recalled pages on the host, not on "
                             f"{self.device}; use pool_dtype=fp16 (or fp32) with device={self.device}")
        self._copier = None
        if xp.is_cuda:
            from .cuda_copy import CudaPageCopier

            self._copier = CudaPageCopier(self.device, lay.page, head_dim, dtype)
        self.pool = PagePool(n_layers, batch, n_kv_heads, head_dim, lay.page, dtype, capacity=max(8, lay.k_pages),
                             summary_device=self.device, pin_memory=self._copier is not None,
                             pool_dtype=self.pool_dtype, backend=xp)
        master = (n_layers, batch, n_kv_heads, lay.master_slots, head_dim)
        # the sink and the ring; each (layer, sequence) is zeroed by `_load` as `start` fills it, so its memory
        # is first touched while the prompt's dense KV is being released, not beside the whole of it
        self.master_keys = xp.empty(master, dtype)
        self.master_values = xp.empty(master, dtype)
        self._views = tuple(KVView(i, lay, n_layers, batch, n_kv_heads, head_dim, dtype, xp, mask_dtype)
                            for i in range(2))
        self._current = 0
        self._lengths = [0] * batch
        self._latest_query: Tensor | None = None  # [L, B, H, D]
        # (``use_fresh_queries``) per view, the query each head's pages were chosen with ([L, B, H, D])
        self._basis: list[Tensor | None] = [None, None]
        self._fresh = False  # ``use_fresh_queries``: ``refresh`` chooses pages, one view, no worker
        self._stale = False  # (fresh) the pool grew since the last step: every head re-selects
        self._speculative_query: Tensor | None = None  # the query the in-flight prefetch selects with
        # the last correction's full selection with the latest query and the pool snapshot it was made
        # against: the next prefetch selects with that same query, so when the snapshot is the same
        # it reuses it instead of selecting again (same pages, one selection less per step)
        self._selected: tuple[Tensor, list[int]] | None = None
        self._pending: Future | None = None
        self._threaded = threaded and self.mode == "freekv"
        self._executor: ThreadPoolExecutor | None = None
        #: optional ``hook(n_pages)`` called after each page copy (one per ``copy_chunk`` layers)
        self.copy_hook: Callable[[int], None] | None = None
        #: layers per page-copy op (default: all layers in one op)
        self.copy_chunk = n_layers
        self._counters = RetrievalStats()
        #: the buffers of the dense KV handed to ``start`` (weak: to report whether they outlive it)
        self._dense: list[tuple[Callable[[], object], int]] = []
        self._dense_after_start = 0
        self._c_recall: bool | None = None  # ``_c_page_ops``, decided on the first ask
        self._prompt: int | None = None  # the prompt length given to ``begin`` (batch 1)
        self._summarized = 0  # pool pages of that prompt whose summaries ``absorb`` already stored

    # ------------------------------------------------------------------ the decode loop's surface
    @property
    def views(self) -> tuple[KVView, KVView]:
        """Both buffers (bind each once; ``view()`` says which one to run)."""
        return self._views

    def view(self) -> KVView:
        """The buffer to run the next engine call on (complete; never written while served)."""
        return self._views[self._current]

    @property
    def slots(self) -> int:
        """View length without the staging slot (the in-place graph's ``write_slot``)."""
        return self.layout.slots

    @property
    def lengths(self) -> list[int]:
        """Tokens held per sequence (pool + sink + recent; padding excluded). Not a position:
        after compaction or padding the runtime tracks positions itself."""
        return list(self._lengths)

    def use_fresh_queries(self) -> None:
        """Choose pages with each step's own queries (decode groups): the caller runs the layers in
        ranges and calls ``refresh(layers, query)`` before each range attends. One view serves every
        step (no double buffer, no worker: the selection needs the query of the step it serves);
        ``finish_step`` appends the token to it. A head keeps its pages while its query stays within
        ``tau`` (group-mean cosine) of the query they were chosen with, and is re-selected when it
        moves away or when a page has left the window since (quest: every head, every step).
        Call before ``start``."""
        if self._latest_query is not None:
            raise RuntimeError("use_fresh_queries() must come before start()")
        self._fresh = True
        self._stale = True

    def refresh(self, layers: range, query: Tensor) -> KVView:
        """Before ``layers`` attend on ``view()``: re-select with ``query`` ``[len(layers), B, H, D]`` (the
        step's own queries of those layers) the heads whose query moved from the one their pages were
        chosen with (or every head; see ``use_fresh_queries``), recall the missing pages."""
        self._check_started()
        if not self._fresh:
            raise RuntimeError("refresh() needs use_fresh_queries() before start()")
        if self.cover:
            raise RuntimeError("cover= is tested inside the decode attention op only: use inline_refresh()")
        xp, view = self.xp, self.view()
        query = xp.asarray(query)
        basis = self._basis[view.index][layers.start:layers.stop]                  # [Lg, B, H, D]
        if self.mode == "quest" or self._stale:
            drifted = xp.full((len(layers), self.batch, self.n_kv_heads), True, "bool")
        else:
            drifted = self._needs_correction(query, basis)                          # [Lg, B, Hkv]
        self._counters.heads_checked += xp.size(drifted)
        corrected = int(drifted.sum())
        self._counters.heads_corrected += corrected
        if corrected:
            start = time.perf_counter()
            # (torch: inference mode; only temporaries are made here, the view and basis are written in place)
            with self._on_copy_stream(wait=True), xp.inference():
                fresh = self.pool.select(slice(layers.start, layers.stop), query, self.layout.k_pages, self.combine,
                                         n_pages=view.n_pages, threads=CRITICAL_PATH_THREADS, only=drifted)
                current = view.slot_pages[layers.start:layers.stop]
                self.recall(view, xp.where(drifted[..., None], fresh, current), layers=layers)
                group = self.n_heads // self.n_kv_heads
                basis[...] = xp.where(xp.repeat(drifted, group, -1)[..., None], query, basis)
            self._sync_device()
            self._counters.correction_s += time.perf_counter() - start
        return view

    def inline_ready(self) -> bool:
        """Whether ``inline_refresh`` can serve this manager: a fresh-query manager (``use_fresh_queries``)
        on host (numpy) arrays with an fp32/fp16 pool, the C page ops built."""
        return self._fresh and self._c_page_ops()

    @contextlib.contextmanager
    def inline_refresh(self):
        """Around one engine call on ``view()`` whose decode attention is kvtrt's op with the refresh hook
        (``page_ops.install_refresh_hook``): before each layer attends, the op does what ``refresh`` does
        for that layer, with the query the layer has just computed (one graph call per step, every
        layer's pages chosen with its own query). The counters are folded into ``stats()`` after it."""
        self._check_started()
        if not self.inline_ready():
            raise RuntimeError("inline_refresh() needs use_fresh_queries() before start(), host arrays, an fp32 or "
                               "fp16 pool and the C page ops")
        view = self.view()
        ctx, counts = self._inline_context(view)
        page_ops.arm(ctx)
        try:
            yield view
        finally:
            page_ops.disarm(ctx)
            c = self._counters
            c.heads_checked += int(counts[0])
            c.heads_corrected += int(counts[1])
            c.pages_selected += int(counts[2])
            c.pages_hit += int(counts[3])
            c.pages_recalled += int(counts[4])
            c.correction_s += counts[5] / 1e9

    def _inline_context(self, view: KVView) -> tuple[page_ops.InlineView, np.ndarray]:
        """What the C refresh reads of ``view`` (its buffers, the pool, summaries, page map, basis, options) and
        the counters it adds to."""
        lay = self.layout
        basis = self._basis[view.index]
        if basis.dtype != np.float32 or not basis.flags.c_contiguous:
            basis = self._basis[view.index] = np.ascontiguousarray(basis, np.float32)
        ctx, counts = page_ops.InlineView(), np.zeros(6, np.int64)
        ctx.view, ctx.pool, ctx.kmin, ctx.kmax = (a.ctypes.data for a in (view.all_kv, self.pool.data, self.pool.kmin,
                                                                            self.pool.kmax))
        ctx.slot_pages, ctx.basis, ctx.counts = view.slot_pages.ctypes.data, basis.ctypes.data, counts.ctypes.data
        ctx.layers, ctx.kv_heads, ctx.group, ctx.dim = self.n_layers, self.n_kv_heads, self.n_heads // self.n_kv_heads, \
            self.head_dim
        ctx.width, ctx.sink, ctx.page, ctx.k = view.all_kv.shape[-2], lay.sink, lay.page, lay.k_pages
        ctx.cap, ctx.n_pages = self.pool.kmin.shape[-2], view.n_pages[0]
        ctx.view_half, ctx.pool_half = view.all_kv.dtype == np.float16, self.pool.data.dtype == np.float16
        tau, cover = self.config.correction(inline=True)
        ctx.every = self.mode == "quest" or tau >= 1.0 or (self._stale and not cover)
        ctx.drift_min, ctx.softmax, ctx.cover = self.drift == "min", self.combine == "softmax", cover
        ctx.smin, ctx.smax, ctx.span, ctx.scap = self.pool.smin.ctypes.data, self.pool.smax.ctypes.data, \
            self.pool.span, self.pool.smin.shape[-2]
        ctx.tau = tau if tau > 0.0 else -2.0  # tau 0: never (a cosine is never below -2)
        return ctx, counts

    def moved(self, query: Tensor, threshold: float) -> bool:
        """Whether some KV head's query ``query`` ``[L, B, H, D]`` (the step just run) is further from the
        query its view pages were chosen with than ``threshold`` (group-mean cosine below it, as
        ``refresh`` measures drift): the step attended pages chosen for another query
        (``use_fresh_queries`` managers)."""
        xp = self.xp
        cos = xp.cosine(xp.asarray(query), self._basis[self.view().index], eps=1e-8)  # [L, B, H]
        return bool((cos.reshape(*cos.shape[:-1], self.n_kv_heads, -1).mean(-1) < threshold).any())

    def count_rerun(self) -> None:
        """A step was run again after a ``refresh`` with its own query (``stats().reruns``)."""
        self._counters.reruns += 1

    def begin(self, n_tokens: int, reserve_tokens: int = 0) -> None:
        """Expect a prompt of ``n_tokens`` (batch 1) whose prefill ``absorb`` follows chunk by chunk,
        so each page's summary is built once its chunk is written, not after the prompt; ``start``
        then stores the pages' data (one copy, the dense KV released layer by layer) and builds the
        rest. ``reserve_tokens`` as in ``start``."""
        if self.batch != 1:
            raise ValueError(f"begin() prefills one sequence; this manager holds {self.batch}")
        self._drain()
        self.pool.reset()
        self.pool.reserve(self._pool_pages(n_tokens, reserve_tokens), exact=True)
        self._prompt, self._summarized = n_tokens, 0

    def absorb(self, keys: Sequence[Tensor], length: int) -> int:
        """Summarize the pool pages that the prefill has completed: tokens ``[0, length)`` of
        ``keys[l]`` ``[1, Hkv, >=length, D]`` are written (all live, in order). Pages that will stay
        in the window at the prompt's end are left to ``start``. Returns the pages summarized so far."""
        if self._prompt is None:
            raise RuntimeError("call begin() with the prompt length before absorb()")
        lay = self.layout
        total = lay.pages_at_start(self._prompt)
        done = min(total, max(0, (length - lay.sink) // lay.page))
        if done > self._summarized:
            a, z = lay.first_unpaged(self._summarized), lay.first_unpaged(done)
            for layer in range(self.n_layers):
                self.pool.summarize_pages(layer, 0, self._summarized, keys[layer][0, :, a:z])
            self._summarized = done
        return self._summarized

    def _pool_pages(self, n_tokens: int, reserve_tokens: int) -> int:
        lay = self.layout
        return max(1, -(-(n_tokens + reserve_tokens - lay.sink - lay.window) // lay.page))

    def start(self, keys: list[Tensor], values: list[Tensor], query: Sequence[Tensor] | Tensor,
              mask: Tensor | None = None, reserve_tokens: int = 0, release: bool = False) -> KVView:
        """Load a prefilled prompt and build the first view from its last query.

        ``keys[l]``/``values[l]`` ``[B, Hkv, N, D]``, ``query[l]`` ``[B, H, D]``; ``mask`` ``[B, N]``
        (optional, nonzero = real token) drops padding or dead slots (any pattern).
        ``reserve_tokens``: tokens decoding may still add; the pool is sized once for the prompt
        plus those (no doubling overshoot when the caller knows the length).
        ``release``: the caller hands the KV over; each layer's entry of ``keys``/``values`` is set
        to ``None`` once it is in the pool, so the prompt's KV is never held twice.
        ``stats().dense_store_bytes_after_start`` says how many bytes of the tensors given here were
        still alive when ``start`` returned (0 when the caller handed them over and kept nothing);
        ``stats().dense_store_bytes`` is the same, now.
        """
        t0 = time.perf_counter()
        self._drain()
        self.pool.reset()
        for view in self._views:
            view.reset()
        self._counters = RetrievalStats()
        self._selected = None
        self._basis = [None, None]
        lay, n_tokens = self.layout, keys[0].shape[2]
        self.pool.reserve(self._pool_pages(n_tokens, reserve_tokens), exact=True)
        xp = self.xp
        if release:  # converted in the caller's lists, which stay the only references (emptied below)
            keys[:], values[:] = [xp.asarray(k) for k in keys], [xp.asarray(v) for v in values]
        else:
            keys, values = [xp.asarray(k) for k in keys], [xp.asarray(v) for v in values]
        mask = None if mask is None else xp.asarray(mask)
        live = [_live_tokens(xp, None if mask is None else mask[b]) for b in range(self.batch)]
        counts = [n_tokens if idx is None else (idx if isinstance(idx, int) else len(idx)) for idx in live]
        live = [None if isinstance(idx, int) else idx for idx in live]  # a prefix: no gather
        pages = [lay.pages_at_start(n) for n in counts]
        # summaries ``absorb`` built during the prefill, if this is the prompt ``begin`` announced
        summarized = self._summarized if (self._prompt == counts[0] and live[0] is None) else 0
        self._prompt, self._summarized = None, 0
        self._counters.pages_summarized_in_prefill = summarized
        ring = [lay.master_slot(xp.arange(lay.first_unpaged(p), max(lay.first_unpaged(p), n)))
                for p, n in zip(pages, counts)]
        self._dense = xp.weak_buffers([*keys, *values])
        for layer in range(self.n_layers):
            for b in range(self.batch):
                self._load(layer, b, keys[layer][b], values[layer][b], live[b], counts[b], pages[b], ring[b],
                           summarized if b == 0 else 0)
            if release:
                keys[layer] = values[layer] = None
                return_freed_memory()  # the layer just freed, if it sat inside the malloc heap
        for view in self._served:  # first touched now, after the dense KV was released
            view.clear()
        for b in range(self.batch):
            self.pool.n_pages[b] = pages[b]
            self._lengths[b] = counts[b]
        self._latest_query = self._stacked(query, copy=True)
        self._current = 0
        self._prepare(self._views[0], self._latest_query, count=False, wait=True)
        self._sync_device()
        self._dense_after_start = self.dense_store_nbytes
        self._counters.start_s = time.perf_counter() - t0
        return self.view()

    def prefetch(self) -> None:
        """Start preparing the other buffer for the next step from the latest query (speculative).

        Call right before the engine runs on ``view()``. No-op in quest mode.
        """
        self._check_started()
        if self.mode != "freekv" or self._fresh:
            return
        if self._pending is not None:
            raise RuntimeError("prefetch() called twice without finish_step()")
        target = self._next_view()
        self._speculative_query = self._latest_query
        if self._copier is not None:
            self._copier.follow_caller()
        if self._threaded:
            if self._executor is None:
                # (torch: the worker keeps the caller's thread count, the scheduler thread's own)
                initializer, initargs = self.xp.thread_setup()
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtrt-freekv",
                                                    initializer=initializer, initargs=initargs)
            self._pending = self._executor.submit(self._prepare, target, self._speculative_query,
                                                  selected=self._take_selection(), threads=1)
            return
        self._pending = Future()
        try:
            self._prepare(target, self._speculative_query, selected=self._take_selection())
            self._pending.set_result(None)
        except BaseException as exc:  # surfaced by finish_step like the threaded path
            self._pending.set_exception(exc)

    @property
    def prefetching(self) -> bool:
        """A prefetch was started and ``finish_step`` has not consumed it yet."""
        return self._pending is not None

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the in-flight preparation (host side); False if it is
        still running. Raises what the preparation raised."""
        if self._pending is None:
            return True
        if not wait([self._pending], timeout).done:
            return False
        self._pending.result()
        return True

    def finish_step(self, query: Sequence[Tensor] | Tensor, new_keys: Sequence[Tensor] | Tensor,
                    new_values: Sequence[Tensor] | Tensor) -> KVView:
        """After the engine call: append the new token, correct drifted heads, swap buffers.

        ``query[l]`` ``[B, H, D]``, ``new_keys[l]``/``new_values[l]`` ``[B, Hkv, 1, D]`` (per-layer
        lists, or tensors with the layers stacked in front). Returns the view for the next step.
        """
        self._check_started()
        query = self._stacked(query, copy=True)
        if self._fresh:  # one view: the token goes into it, pages are chosen by the next step's refreshes
            view = self.view()
            self._append_token(new_keys, new_values, view)
            pages = list(view.n_pages)
            self._prepare(view, None)
            self._stale = view.n_pages != pages  # a page left the window: every head re-selects
            self._latest_query = query
            self._counters.steps += 1
            return view
        target = self._next_view()
        speculative = self._pending is not None
        if speculative:
            start = time.perf_counter()
            self._drain()
            self._counters.wait_s += time.perf_counter() - start
        self._append_token(new_keys, new_values, target if speculative else None)
        start = time.perf_counter()
        if speculative:
            self._correct(target, query)
            self._counters.correction_s += time.perf_counter() - start
        else:
            self._prepare(target, query, wait=True)
            self._sync_device()
            self._counters.sync_prepare_s += time.perf_counter() - start
        self._latest_query = query
        self._speculative_query = None
        self._current = 1 - self._current
        self._counters.steps += 1
        return self.view()

    def select(self, query: Sequence[Tensor] | Tensor) -> KVView:
        """Re-select the *current* view in place with ``query`` (Quest: the current step's query).

        Only missing pages are recalled. Not allowed while a prefetch is in flight.
        """
        self._check_started()
        if self._pending is not None:
            raise RuntimeError("select() while a prefetch is in flight; call it before prefetch()")
        query = self._stacked(query, copy=True)
        self._prepare(self.view(), query, wait=True)
        self._sync_device()
        self._latest_query = query
        return self.view()

    def fresh_selection(self, layer: int, query: Tensor, view: KVView | None = None) -> Tensor:
        """What a fresh top-k selection with ``query`` ``[B, H, D]`` picks for ``layer`` ``[B, Hkv, k]``
        against ``view``'s pool snapshot (default: the current view)."""
        n_pages = (view or self.view()).n_pages
        return self.pool.select(layer, query, self.layout.k_pages, self.combine, n_pages=n_pages)

    def recall(self, view: KVView, pages: Tensor, count: bool = True, layers: range | None = None,
               threads: int = CRITICAL_PATH_THREADS) -> None:
        """Make ``view``'s page slots hold ``pages`` ``[L, B, Hkv, k]`` (``-1`` = none); with ``layers``,
        only those layers' (``pages`` ``[len(layers), B, Hkv, k]``). ``threads``: for the C copy (1 in the
        worker, beside the decode graph).

        Pages already resident stay in their slot; missing pages go to the free slots in ascending
        slot order; only those are copied (``copy_chunk`` layers per copy op).
        """
        xp = self.xp
        slot_pages = view.slot_pages if layers is None else view.slot_pages[layers.start:layers.stop]
        if self._host_recall():  # placement and copy in one C call
            counts = np.zeros(3, np.int64)
            page_ops.recall(slot_pages, pages, self.pool.data, view.all_kv, 0 if layers is None else layers.start,
                            self.layout.sink, counts, threads)
            selected, hits, copied = counts.tolist()
            if self.copy_hook is not None:
                self.copy_hook(copied)
        else:
            plan = _placement(xp, slot_pages, xp.asarray(pages))
            if layers is not None and layers.start:
                plan = plan._replace(layers=plan.layers + layers.start)
            selected, hits, copied = plan.selected, plan.hits, len(plan.pages)
            bounds = [0, len(plan.layers)]
            if self.copy_chunk < self.n_layers:
                edges = xp.arange(0, self.n_layers + self.copy_chunk)[::self.copy_chunk]
                bounds = xp.searchsorted(plan.layers, edges).tolist()
            for a, z in zip(bounds[:-1], bounds[1:]):
                self._copy_pages(view, plan.layers[a:z], plan.seqs[a:z], plan.heads[a:z], plan.slots[a:z],
                                 plan.pages[a:z])
            slot_pages[...] = plan.slot_pages
        if count:
            self._counters.pages_selected += selected
            self._counters.pages_hit += hits
            self._counters.pages_recalled += copied

    @property
    def nbytes(self) -> int:
        """Bytes this manager holds: the stored KV plus both views."""
        return self.stored_nbytes + self.view_nbytes

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the stored KV: host pool (with its summaries and int8 scales) and the sink/recent
        master copy (the pool is the only full copy of the KV)."""
        return self.pool.nbytes + sum(self.xp.nbytes(t) for t in (self.master_keys, self.master_values))

    @property
    def pool_nbytes(self) -> int:
        """Bytes of the page store alone (``pool_dtype``; with its int8 scales, without the summaries)."""
        return sum(self.xp.nbytes(t) for t in (self.pool.data, self.pool.kq, self.pool.vq) if t is not None)

    @property
    def dense_store_nbytes(self) -> int:
        """Bytes of the dense KV given to ``start`` that are still alive (anywhere: the caller's store,
        a view of it, a list that was not handed over). 0 once the pool is the only full copy."""
        return sum(nbytes for ref, nbytes in self._dense if ref() is not None)

    @property
    def _served(self) -> tuple[KVView, ...]:
        """The views steps run on: both, alternating; one with ``use_fresh_queries`` (the other is
        never touched, so never resident)."""
        return self._views[:1] if self._fresh else self._views

    @property
    def view_nbytes(self) -> int:
        """Bytes of the views the engine reads (fixed by the budget): two double-buffered ones, or one
        with ``use_fresh_queries``."""
        return sum(view.nbytes for view in self._served)

    def stats(self) -> RetrievalStats:
        """Counters since ``start``, with the sizes and memory held now."""
        counters = self._counters
        return replace(counters, recalled_bytes=counters.pages_recalled * self.pool.page_nbytes,
                       pool_pages=self.pool.n_pages.tolist(), budget=self.budget, k_pages=self.layout.k_pages,
                       slots=self.slots, stored_bytes=self.stored_nbytes, view_bytes=self.view_nbytes,
                       pool_bytes=self.pool_nbytes, pool_dtype=self.pool_dtype,
                       dense_store_bytes_after_start=self._dense_after_start,
                       dense_store_bytes=self.dense_store_nbytes)

    def close(self) -> None:
        """Wait for any in-flight prefetch and stop the worker thread."""
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> FreeKVRetrieval:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
        except Exception:
            pass

    # ------------------------------------------------------------------ internals
    def _next_view(self) -> KVView:
        return self._views[1 - self._current]

    def _check_started(self) -> None:
        if self._latest_query is None:
            raise RuntimeError("call start() with the prefilled KV before decoding")

    def _drain(self) -> None:
        """Consume the in-flight prefetch: wait for it and for the copies it queued."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            finally:
                self._sync_device()

    def _load(self, layer: int, b: int, keys: Tensor, values: Tensor, live: Tensor | None, n: int, n_pages: int,
              ring_slots: Tensor, summarized: int = 0) -> None:
        """Store one layer of prompt ``b`` (``[Hkv, N, D]``, ``live`` token indices or the first ``n``):
        whole pages outside sink and window into the pool (the first ``summarized`` pages' summaries
        are there already), the sink and the rest into the master copy."""
        lay = self.layout
        xp = self.xp
        if live is not None:  # one layer's gathered copy
            keys, values = xp.take(keys, live, 1), xp.take(values, live, 1)
        sink, first = min(lay.sink, n), lay.first_unpaged(n_pages)
        self.master_keys[layer, b] = 0
        self.master_values[layer, b] = 0
        if n_pages:
            self.pool.write(layer, b, 0, xp.to_host(keys[:, lay.sink:first]), xp.to_host(values[:, lay.sink:first]),
                            summarized=summarized)
        self.master_keys[layer, b, :, :sink] = keys[:, :sink]
        self.master_values[layer, b, :, :sink] = values[:, :sink]
        if n > first:
            self.master_keys[layer, b][:, ring_slots] = xp.to_device(keys[:, first:n], self.dtype)
            self.master_values[layer, b][:, ring_slots] = xp.to_device(values[:, first:n], self.dtype)

    def _c_page_ops(self) -> bool:
        """Whether this pool's pages can be recalled in C (``cpu_kernels.page_ops``): numpy arrays, an
        fp32/fp16 pool, the library built (decided on the first ask)."""
        if self._c_recall is None:
            self._c_recall = (isinstance(self.pool.data, np.ndarray) and self.pool.int8_scheme is None
                              and page_ops.available())
        return self._c_recall

    def _host_recall(self) -> bool:
        """Whether recalls run as one C call: ``_c_page_ops`` and one copy op for every layer."""
        return self._c_page_ops() and self.copy_chunk == self.n_layers

    def _on_copy_stream(self, wait: bool = False):
        return contextlib.nullcontext() if self._copier is None else self._copier.on_stream(wait)

    def _sync_device(self) -> None:
        if self._copier is not None:
            self._copier.synchronize()

    def _select(self, query: Tensor, view: KVView, threads: int = CRITICAL_PATH_THREADS) -> Tensor:
        """Top-k pages ``[L, B, Hkv, k]`` for ``query`` ``[L, B, H, D]`` within ``view``'s pool snapshot
        (``threads``: 1 in the worker, beside the decode graph)."""
        return self.pool.select(None, query, self.layout.k_pages, self.combine, n_pages=view.n_pages, threads=threads)

    def _take_selection(self) -> tuple[Tensor, list[int]] | None:
        selected, self._selected = self._selected, None
        return selected

    def _prepare(self, view: KVView, query: Tensor | None, count: bool = True, wait: bool = False,
                 selected: tuple[Tensor, list[int]] | None = None, threads: int = CRITICAL_PATH_THREADS) -> None:
        """Bring ``view`` up to date: pool snapshot, missing tokens, top-k pages for ``query`` (None:
        the page slots are left to ``refresh``), mask.

        On CUDA everything is queued on the copy stream (``wait``: after the work already queued
        on the caller's stream; the worker does not wait, ``prefetch`` ordered it already).
        """
        with self._on_copy_stream(wait):
            view.n_pages = self.pool.n_pages.tolist()
            self._counters.tokens_copied += view.copy_unpaged(self.master_keys, self.master_values, self._lengths)
            if query is not None:
                reuse = selected is not None and selected[1] == view.n_pages
                self._counters.selections_reused += int(reuse)
                self.recall(view, selected[0] if reuse else self._select(query, view, threads), count=count,
                            threads=threads)
                if self._fresh:
                    self._basis[view.index] = self.xp.clone(query)
            view.update_mask(self._lengths, non_blocking=self._copier is not None)

    def _correct(self, view: KVView, query: Tensor) -> None:
        """Re-select with ``query`` the heads whose query drifted from the speculative one; recall."""
        drifted = self._needs_correction(query, self._speculative_query)  # [L, B, Hkv]
        self._counters.heads_checked += self.xp.size(drifted)
        corrected = int(drifted.sum())
        self._counters.heads_corrected += corrected
        if corrected:
            with self._on_copy_stream(wait=True):
                fresh = self._select(query, view)
                self._selected = (fresh, list(view.n_pages))
                self.recall(view, self.xp.where(drifted[..., None], fresh, view.slot_pages))
            self._sync_device()
        # the view's mask is current: the worker set it, _append_token marked the new token's slot,
        # and a correction only swaps pages within the live page slots

    def _copy_pages(self, view: KVView, layers: Tensor, seqs: Tensor, heads: Tensor, slots: Tensor,
                    pages: Tensor) -> None:
        count = len(pages)
        if count and self._copier is None:
            view.put_pages(self.pool, layers, seqs, heads, slots, pages)
        elif count:
            self._copier.copy_pages(self.pool, *view.page_region(), layers, seqs, heads, slots, pages)
        if self.copy_hook is not None:
            self.copy_hook(count)

    def _append_token(self, new_keys: Sequence[Tensor] | Tensor, new_values: Sequence[Tensor] | Tensor,
                      view: KVView | None) -> None:
        """Write the step's token into the master copy (and ``view``); spill a full ring page to the pool."""
        xp = self.xp
        keys = xp.to_device(self._stacked(new_keys)[:, :, :, -1], self.dtype)  # [L, B, Hkv, D]
        values = xp.to_device(self._stacked(new_values)[:, :, :, -1], self.dtype)
        lay = self.layout
        for b in range(self.batch):
            token = self._lengths[b]
            slot = lay.master_slot(token)
            self.master_keys[:, b, :, slot] = keys[:, b]
            self.master_values[:, b, :, slot] = values[:, b]
            if view is not None:
                view.write_token(b, token, keys[:, b], values[:, b])
            self._lengths[b] = token + 1
            first = lay.first_unpaged(int(self.pool.n_pages[b]))
            if self._lengths[b] - first >= lay.ring_size:  # ring full: its oldest page leaves the window
                slots = lay.master_slot(xp.arange(first, first + lay.page))
                self.pool.append(b, xp.to_host(self.master_keys[:, b][:, :, slots]),
                                 xp.to_host(self.master_values[:, b][:, :, slots]))

    def _needs_correction(self, query: Tensor, speculative: Tensor) -> Tensor:
        """``[L, B, Hkv]`` bool: KV heads whose query heads' cos(q_t, q_{t-1}), combined by ``drift``
        (group mean, or the least of them), is below ``tau``."""
        xp, shape = self.xp, (query.shape[0], self.batch, self.n_kv_heads)
        if self.tau >= 1.0 or self.tau <= 0.0:
            return xp.full(shape, self.tau >= 1.0, "bool")
        cos = xp.cosine(query, speculative, eps=1e-8)                            # [L, B, H]
        cos = cos.reshape(*cos.shape[:-1], self.n_kv_heads, -1)                 # [L, B, Hkv, g]
        return (cos.mean(-1) if self.drift == "mean" else xp.amin(cos, -1)) < self.tau

    def _stacked(self, per_layer: Sequence[Tensor] | Tensor, copy: bool = False) -> Tensor:
        """One ``[L, ...]`` array here from per-layer arrays (one already stacked is used as is, or
        copied with ``copy``)."""
        xp = self.xp
        if isinstance(per_layer, (list, tuple)):
            return xp.stack([xp.asarray(t) for t in per_layer])
        stacked = xp.asarray(per_layer.detach() if hasattr(per_layer, "detach") else per_layer)
        return xp.clone(stacked) if copy else stacked


def _placement(xp, slot_pages: Tensor, selected: Tensor) -> _Placement:
    """Where the pages of ``selected`` ``[L, B, Hkv, k]`` that ``slot_pages`` lacks go: the free page
    slots (those holding no selected page) in ascending order."""
    valid = selected >= 0
    present = (selected[..., :, None] == slot_pages[..., None, :]).any(-1) & valid  # over selected entries
    missing = valid & ~present
    keep = (slot_pages[..., :, None] == selected[..., None, :]).any(-1) & (slot_pages >= 0)  # over slots
    first = xp.arange(slot_pages.shape[-1]) < missing.sum(-1)[..., None]
    missing_first = xp.argsort_stable(xp.astype(~missing, "uint8"), -1)
    free_first = xp.argsort_stable(xp.astype(keep, "uint8"), -1)
    pages = xp.take_along(selected, missing_first, -1)[first]
    slots = free_first[first]
    layers, seqs, heads = xp.nonzero(first)[:3]  # row-major: sorted by layer
    new_map = xp.where(keep, slot_pages, -1)
    new_map[layers, seqs, heads, slots] = pages
    return _Placement(layers, seqs, heads, slots, pages, new_map, int(valid.sum()), int(present.sum()))




def _live_tokens(xp, mask: Tensor | None) -> Tensor | int | None:
    """The live token indices of one row's ``mask`` ``[N]``: ``None`` (no mask: all N), their count
    when they are a prefix ``[0, count)`` (nothing to gather), else the indices."""
    if mask is None:
        return None
    idx = xp.nonzero(xp.astype(mask, "bool"))[0]
    count = len(idx)
    if count == 0 or int(idx[-1]) == count - 1:
        return count
    return idx
