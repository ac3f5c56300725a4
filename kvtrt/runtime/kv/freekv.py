"""FreeKV-style KV retrieval between decode steps of a monolithic decode graph (GitHub issue 4).

The decode graph attends, per layer ``l``, to ``past_key.l``/``past_value.l`` ``[B, Hkv, P, D]``
(keys already RoPE-rotated, positions explicit, so slot order is irrelevant: attention is
permutation-invariant) under ``past_mask`` ``[B, P]`` (1 = live slot), and returns the new
token's ``key.l``/``value.l`` ``[B, Hkv, 1, D]`` and rotated query ``query.l`` ``[B, H, D]``.
This module keeps the whole context in host memory and hands the graph a small, fixed-size
*view* of it: the attention sink, the recent window and the ``k`` pages that matter most for the
current query, per KV head.

Usage (what the runtime calls)::

    r = build_retrieval("freekv:budget=1024").create(n_layers, n_kv_heads, n_heads, head_dim,
                                                     batch=1, dtype=torch.float32,
                                                     mask_dtype=torch.int64)  # past_mask dtype
    r.start(keys, values, query, mask=None)  # after prefill: [B,Hkv,N,D] per layer, last prompt query [B,H,D]
    a, b = r.views                           # the two fixed buffers: bind each once
    while decoding:
        view = r.view()                      # .keys/.values: per layer [B,Hkv,slots,D]; .mask [B,slots]
        r.prefetch()                         # right before the engine call on `view`
        out = engine(view)                   # positions are the runtime's own
        r.finish_step(out.query, out.keys, out.values)  # returns the next view
    r.stats(); r.close()

``create(..., threaded=False)`` runs the speculative preparation inline in ``prefetch()`` (same
results, no overlap; for debugging). ``r.copy_hook = fn`` calls ``fn(n_pages)`` after every
page-copy op (``r.copy_chunk`` layers per op, default all layers in one op): tests use it to
count and to delay copies.

Quest mode (``quest:...``) is synchronous: ``prefetch()`` does nothing and ``finish_step`` builds
the next view from the query it is given. To select with the *current* query the runtime runs
the step twice: engine on ``view`` to get a probe ``q_t``, ``r.select(q_t)`` (re-selects the
current view in place, recalling only missing pages), engine again on the same view, then
``finish_step``. ``select`` also works in FreeKV mode (never while a prefetch is in flight).

Spec (see ``build_retrieval``)::

    freekv:budget=B,page=32,sink=4,window=64,tau=0.9,combine=softmax|mean,min_context=N
    quest:budget=B,page=32,sink=4,window=64,min_context=N

``budget`` (default 2048) counts attended tokens, sink and window included: ``k = (budget -
sink - window) // page`` pages are selected per KV head. A fraction (``budget=0.25``) is resolved
against ``max_context`` given to ``create``. Defaults: ``page=32`` (FreeKV/Quest page size),
``sink=4`` (StreamingLLM's attention sink), ``window=64`` (two pages of recent tokens, always
attended), ``tau=0.9``, ``combine=softmax``. ``min_context`` (default ``2*budget``): retrieval runs
only for caches longer than this; a shorter cache is decoded densely (exact, and faster: with the
view holding half the cache or more, the per-step selection and recall cost more than the
attention they save; measured at 2048 tokens, budget 1024). ``min_context=0`` always retrieves.

Slot layout of a view (fixed ``slots = sink + k*page + window + page``)::

    [0, sink)                          sink tokens (token i at slot i)
    [sink, ring = sink + k*page)       k selected pages: page slot j is [sink + j*page, sink + (j+1)*page)
    [ring, ring + window + page)       recent ring: token i >= sink at ring + (i - sink) % (window+page)

The recent part holds between ``window`` and ``window + page - 1`` tokens: once it reaches
``window + page`` tokens its oldest ``page`` tokens are spilled into the host pool as a new page
(with its min/max summary). A view prepared just before a spill keeps the spilled tokens in its
ring for one step, so a view attends at most ``slots <= budget + page`` tokens. While
``n_pages <= k`` page ``j`` sits in page slot ``j`` (missing pages always fill the lowest free
slots), so the live page slots are a prefix ``min(k, n_pages)`` shared by all KV heads and one
mask ``[B, slots]`` serves every head. With ``budget >= context`` every page is selected, i.e.
the view holds every token and attention over it equals full attention. Sequences of a batch may have different
lengths (``start(mask=...)`` drops padding); each is laid out independently.

Speculative retrieval + correction, adapted to a monolithic graph. FreeKV selects the pages for
step ``t+1`` at layer ``l`` from the query of step ``t`` *inside* the model, overlapping the
recall with compute, then corrects the heads whose query drifted. Here the graph is one call, so
``q_t`` is only known after step ``t`` returns. Hence:

* ``prefetch()`` (right before the engine call of step ``t``) starts a worker that prepares the
  *other* buffer for step ``t+1`` from ``q_{t-1}`` (the latest query known): it selects the top-k
  pages per (layer, KV head), recalls the pages that buffer lacks and copies it the new tokens;
* ``finish_step(q_t, ...)`` waits for the worker, writes the new token into that buffer, then for
  every (layer, sequence, KV head) whose cosine similarity between ``q_t`` and ``q_{t-1}``
  (averaged over the group's query heads) is below ``tau`` re-selects with ``q_t`` and recalls the
  missing pages (correction, on the critical path), and swaps buffers. ``tau=1`` corrects every
  head (always the freshest query, even when the cosine rounds to 1), ``tau=0`` never corrects
  (pure speculation, even for negative cosines).

Page scores are Quest's ``sum_d max(q_d*kmax_d, q_d*kmin_d)`` per query head; the query heads of a
KV group share one selection (``combine=softmax``: mean over the group of the per-head softmax
over pages of ``score/sqrt(D)``; ``combine=mean``: mean of the raw scores), see ``kv.pages``.

Incremental double-buffered recall: two views alternate between steps, so the engine never
reads a buffer that is being written (the worker only ever writes the buffer that is not
served; ``finish_step`` swaps only after the worker and the corrections are done). Each buffer
keeps its slot-to-page map per (layer, sequence, KV head) and receives only the pages it lacks
(misses) and the tokens added since it was last prepared. A spilled page stays in the ring of the
buffer prepared before the spill and is only selectable in buffers prepared after it (a buffer
never holds a token twice). On CPU the worker is a thread (torch releases the GIL in copies);
with a CUDA ``device`` the pool lives in pinned host memory and pages are staged and copied on
a side stream (written against the documented ``torch.cuda`` API, imported lazily, untested
without a GPU).

``stats()`` reports per run: steps, correction rate (corrected / checked heads), page hit rate
(selected pages already resident / selected pages), pages and bytes recalled per step, and the
seconds ``finish_step`` waited for the worker and spent on corrections, and the memory held:
``stored_bytes`` (pool, summaries, sink/recent master copy) and ``view_bytes`` (both views).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .pages import COMBINES, PagePool
from .spec import KVSpecError, Stage, parse_budget, parse_kv_spec, resolve_budget

DEFAULT_BUDGET = 2048
DEFAULT_PAGE = 32
DEFAULT_SINK = 4
DEFAULT_WINDOW = 64
DEFAULT_TAU = 0.9
DEFAULT_COMBINE = "softmax"

_KEYS = {
    "freekv": ("budget", "page", "sink", "window", "tau", "combine", "min_context"),
    "quest": ("budget", "page", "sink", "window", "min_context"),
}


# ---------------------------------------------------------------------------------------------
# spec


def _int_opt(stage: Stage, key: str, default: int, minimum: int) -> int:
    raw = stage.params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise KVSpecError(f"{stage.name}: {key}={raw!r} is not a whole number; e.g. {key}={default}") from None
    if value < minimum:
        raise KVSpecError(f"{stage.name}: {key}={value} must be at least {minimum}; e.g. {key}={default}")
    return value


@dataclass(frozen=True)
class RetrievalConfig:
    """A validated ``freekv``/``quest`` stage. ``create(...)`` builds the runtime manager."""

    mode: str = "freekv"
    budget: int | float = DEFAULT_BUDGET
    page: int = DEFAULT_PAGE
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    tau: float = DEFAULT_TAU
    combine: str = DEFAULT_COMBINE
    min_context: int | None = None

    @property
    def min_budget(self) -> int:
        return self.sink + self.window + self.page

    def budget_tokens(self, max_context: int | None = None) -> int:
        """The budget in tokens (a fraction needs ``max_context``)."""
        if isinstance(self.budget, float):
            if max_context is None:
                raise KVSpecError(
                    f"{self.mode}: budget={self.budget} is a fraction of the context, but the view has a fixed "
                    f"size; give a token count (e.g. budget=1024) or pass max_context to create()"
                )
            budget = resolve_budget(self.budget, max_context)
        else:
            budget = self.budget
        if budget < self.min_budget:
            raise KVSpecError(
                f"{self.mode}: budget={budget} tokens is below sink+window+page = {self.sink}+{self.window}+"
                f"{self.page} = {self.min_budget}; raise budget to at least {self.min_budget} "
                f"or lower window/page"
            )
        return budget

    def threshold(self, context: int) -> int:
        """``min_context``, or by default twice the budget (resolved against ``context``)."""
        return self.min_context if self.min_context is not None else 2 * self.budget_tokens(context)

    def engages(self, context: int) -> bool:
        """Whether retrieval runs for a cache of ``context`` tokens: above the threshold. Below it
        the view would hold half the cache or more, so retrieval costs more per step than it saves,
        and decoding attends to the whole cache instead (exact)."""
        return context > self.threshold(context)

    def k_pages(self, max_context: int | None = None) -> int:
        """Pages selected per KV head: ``(budget - sink - window) // page``."""
        return (self.budget_tokens(max_context) - self.sink - self.window) // self.page

    def slots(self, max_context: int | None = None) -> int:
        """View length ``sink + k*page + window + page``."""
        return self.sink + self.k_pages(max_context) * self.page + self.window + self.page

    def __str__(self) -> str:
        s = f"{self.mode}:budget={self.budget},page={self.page},sink={self.sink},window={self.window}"
        s += f",tau={self.tau},combine={self.combine}" if self.mode == "freekv" else ""
        return s + (f",min_context={self.min_context}" if self.min_context is not None else "")

    def create(
        self,
        n_layers: int,
        n_kv_heads: int,
        n_heads: int,
        head_dim: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | str = "cpu",
        mask_dtype: torch.dtype = torch.bool,
        max_context: int | None = None,
        threaded: bool = True,
        staging_slot: bool = False,
    ) -> FreeKVRetrieval:
        return FreeKVRetrieval(
            self, n_layers, n_kv_heads, n_heads, head_dim, batch, dtype,
            device=device, mask_dtype=mask_dtype, max_context=max_context, threaded=threaded,
            staging_slot=staging_slot,
        )


def build_retrieval(stage: Stage | str) -> RetrievalConfig:
    """Validate a ``freekv:...``/``quest:...`` stage (or a spec string holding one)."""
    if isinstance(stage, str):
        spec = parse_kv_spec(stage)
        if spec.retrieval is None:
            raise KVSpecError(f"{stage!r} has no retrieval stage; write e.g. 'freekv:budget=1024'")
        stage = spec.retrieval
    name = stage.name
    if name not in _KEYS:
        raise KVSpecError(f"{name!r} is not a retrieval policy; use freekv or quest (e.g. 'freekv:budget=1024')")
    unknown = [k for k in stage.params if k not in _KEYS[name]]
    if unknown:
        hint = " (tau/combine are FreeKV options; use freekv:...)" if name == "quest" and set(unknown) <= {
            "tau", "combine"} else ""
        raise KVSpecError(
            f"{name}: unknown option(s) {', '.join(unknown)}; valid options are {', '.join(_KEYS[name])}{hint}"
        )
    budget: int | float = DEFAULT_BUDGET
    if "budget" in stage.params:
        budget = parse_budget(stage.params["budget"], f"{name} budget")
    page = _int_opt(stage, "page", DEFAULT_PAGE, 1)
    sink = _int_opt(stage, "sink", DEFAULT_SINK, 0)
    window = _int_opt(stage, "window", DEFAULT_WINDOW, 0)
    tau = DEFAULT_TAU if name == "freekv" else 1.0
    if "tau" in stage.params:
        raw = stage.params["tau"]
        try:
            tau = float(raw)
        except ValueError:
            raise KVSpecError(
                f"freekv: tau={raw!r} is not a number; give a cosine threshold in [0, 1], e.g. tau=0.9"
            ) from None
        if not 0.0 <= tau <= 1.0:
            raise KVSpecError(
                f"freekv: tau={raw} is outside [0, 1]; tau=0 never corrects, tau=1 always corrects, e.g. tau=0.9"
            )
    combine = stage.params.get("combine", DEFAULT_COMBINE).lower()
    if combine not in COMBINES:
        raise KVSpecError(f"freekv: combine={combine!r}; use combine=softmax or combine=mean")
    min_context = _int_opt(stage, "min_context", 0, 0) if "min_context" in stage.params else None
    cfg = RetrievalConfig(name, budget, page, sink, window, tau, combine, min_context)
    if isinstance(budget, int):
        cfg.budget_tokens()  # budget < sink + window + page -> KVSpecError now
    return cfg


# ---------------------------------------------------------------------------------------------
# views


class KVView:
    """One of the two fixed view buffers.

    ``keys[l]``/``values[l]`` ``[B, Hkv, slots + staging, D]`` (contiguous; slices of ``all_keys`` /
    ``all_values`` ``[L, ...]``, themselves the two halves of one ``all_kv`` ``[2, L, ...]``) and ``mask``
    ``[B, slots + staging]`` are allocated once and only ever filled in place.
    With ``staging`` (1) the last slot is where an in-place graph writes the step's new K/V
    (``write_slot = slots``); it is always live, and the runtime files its content afterwards.
    ``slot_pages`` ``[L, B, Hkv, k]`` is the page id held by each page slot (``-1`` empty);
    ``n_pages[b]`` is the pool snapshot this buffer was prepared against (its ring covers tokens
    from ``sink + n_pages[b]*page``); ``length[b]`` counts the tokens it has received.
    """

    def __init__(self, index, n_layers, batch, n_kv_heads, slots, head_dim, k, dtype, device, mask_dtype,
                 staging: int = 0):
        self.index = index
        shape = (n_layers, batch, n_kv_heads, slots + staging, head_dim)
        self.all_kv = torch.zeros((2, *shape), dtype=dtype, device=device)  # one block: a page's K and V
        self.all_keys, self.all_values = self.all_kv.unbind(0)  # are recalled by one copy op
        self.keys = list(self.all_keys.unbind(0))
        self.values = list(self.all_values.unbind(0))
        self.mask = torch.zeros((batch, slots + staging), dtype=mask_dtype, device=device)
        self.slot_pages = torch.full((n_layers, batch, n_kv_heads, k), -1, dtype=torch.long, device=device)
        self.n_pages = [0] * batch
        self.length = [0] * batch

    def reset(self) -> None:
        self.slot_pages.fill_(-1)
        self.mask.zero_()
        self.n_pages = [0] * len(self.n_pages)
        self.length = [0] * len(self.length)


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stacked(per_layer: Sequence[Tensor] | Tensor) -> Tensor:
    """One ``[L, ...]`` tensor from per-layer tensors (a tensor already stacked is used as is)."""
    return per_layer.detach() if isinstance(per_layer, Tensor) else torch.stack([t.detach() for t in per_layer])


def _cos_per_kv_head(q: Tensor, q_ref: Tensor, n_kv_heads: int) -> Tensor:
    """Cosine similarity ``[..., B, Hkv]`` between two ``[..., B, H, D]`` queries, averaged per group."""
    cos = torch.nn.functional.cosine_similarity(q.float(), q_ref.float(), dim=-1, eps=1e-8)  # [..., B, H]
    return cos.reshape(*cos.shape[:-1], n_kv_heads, -1).mean(dim=-1)


class FreeKVRetrieval:
    """Retrieval state of one batch of sequences: host pool, recent tokens, two view buffers, worker."""

    def __init__(
        self,
        config: RetrievalConfig,
        n_layers: int,
        n_kv_heads: int,
        n_heads: int,
        head_dim: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | str = "cpu",
        mask_dtype: torch.dtype = torch.bool,
        max_context: int | None = None,
        threaded: bool = True,
        staging_slot: bool = False,
    ) -> None:
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.config = config
        self.mode = config.mode
        self.L, self.Hkv, self.H, self.D, self.B = n_layers, n_kv_heads, n_heads, head_dim, batch
        self.dtype = dtype
        self.device = torch.device(device)
        self.S, self.page, self.W = config.sink, config.page, config.window
        self.R = self.W + self.page  # ring capacity
        self.budget = config.budget_tokens(max_context)
        self.k = config.k_pages(max_context)
        self.ring_off = self.S + self.k * self.page
        self.slots = self.ring_off + self.R
        self.staging = int(staging_slot)  # one slot after the view for an in-place graph's new K/V
        self.tau = config.tau
        self.combine = config.combine
        self._cuda = self.device.type == "cuda"
        self.pool = PagePool(n_layers, batch, n_kv_heads, head_dim, self.page, dtype,
                             capacity=max(8, self.k), summary_device=self.device, pin_memory=self._cuda)
        # master copy of sink + recent ring (same slot rule as a view, without the page region)
        mshape = (n_layers, batch, n_kv_heads, self.S + self.R, head_dim)
        self._mk = torch.zeros(mshape, dtype=dtype, device=self.device)
        self._mv = torch.zeros(mshape, dtype=dtype, device=self.device)
        self._bufs = tuple(
            KVView(i, n_layers, batch, n_kv_heads, self.slots, head_dim, self.k, dtype, self.device, mask_dtype,
                   self.staging)
            for i in range(2)
        )
        self._cur = 0
        self._n = [0] * batch
        self._query: Tensor | None = None  # [L, B, H, D], the latest query
        self._spec_query: Tensor | None = None  # the query the in-flight prefetch selects with
        self._pending: Future | None = None
        self._threaded = threaded and self.mode == "freekv"
        self._executor: ThreadPoolExecutor | None = None
        #: optional ``hook(n_pages)`` called after each page copy (one per ``copy_chunk`` layers)
        self.copy_hook: Callable[[int], None] | None = None
        #: layers per page-copy op (default: all layers in one op)
        self.copy_chunk = n_layers
        self._cuda_state = None
        self._reset_stats()

    # ------------------------------------------------------------------ public API
    @property
    def views(self) -> tuple[KVView, KVView]:
        """Both buffers (bind each once; ``view()`` says which one to run)."""
        return self._bufs

    def view(self) -> KVView:
        """The buffer to run the next engine call on (complete; never written while served)."""
        return self._bufs[self._cur]

    @property
    def lengths(self) -> list[int]:
        """Tokens held per sequence (pool + sink + recent; padding excluded). Not a position:
        after compaction or padding the runtime tracks positions itself."""
        return list(self._n)

    def start(
        self,
        keys: list[Tensor],
        values: list[Tensor],
        query: Sequence[Tensor] | Tensor,
        mask: Tensor | None = None,
        reserve_tokens: int = 0,
        release: bool = False,
    ) -> KVView:
        """Load a prefilled prompt and build the first view from its last query.

        ``keys[l]``/``values[l]`` ``[B, Hkv, N, D]``, ``query[l]`` ``[B, H, D]``; ``mask`` ``[B, N]``
        (optional, nonzero = real token) drops padding or dead slots (any pattern).
        ``reserve_tokens``: tokens decoding may still add; the pool is sized once for the prompt
        plus those (no doubling overshoot when the caller knows the length).
        ``release``: the caller hands the KV over; each layer's entry of ``keys``/``values`` is set
        to ``None`` once it is in the pool, so the prompt's KV is never held twice (peak memory:
        the pool plus one layer of the prefilled store, not both whole).
        """
        self._drain()
        self.pool.reset()
        for buf in self._bufs:
            buf.reset()
        self._reset_stats()
        n_tok = keys[0].shape[2]
        self.pool.reserve(max(1, -(-(n_tok + reserve_tokens - self.S - self.W) // self.page)), exact=True)
        live = [None if mask is None else torch.nonzero(mask[b].to(torch.bool), as_tuple=True)[0].to(keys[0].device)
                for b in range(self.B)]
        counts = [n_tok if idx is None else int(idx.numel()) for idx in live]
        pages = [max(0, (n - min(self.S, n) - self.W) // self.page) for n in counts]
        ends = [self.S + p * self.page for p in pages]  # first token of the recent ring, per sequence
        recent = [self._master_slots(torch.arange(lo, max(lo, n))).to(self.device) for lo, n in zip(ends, counts)]
        for layer in range(self.L):
            for b in range(self.B):
                n, idx, lo, slots = counts[b], live[b], ends[b], recent[b]
                # [Hkv, n, D]: views without a mask, one layer's gathered copy with one
                kb = keys[layer][b] if idx is None else keys[layer][b].index_select(1, idx)
                vb = values[layer][b] if idx is None else values[layer][b].index_select(1, idx)
                s = min(self.S, n)
                if pages[b]:
                    self.pool.write(layer, b, 0, kb[:, self.S : lo].cpu(), vb[:, self.S : lo].cpu())
                self._mk[layer, b, :, :s] = kb[:, :s]
                self._mv[layer, b, :, :s] = vb[:, :s]
                if n > lo:
                    self._mk[layer, b][:, slots] = kb[:, lo:n].to(self.device, self.dtype)
                    self._mv[layer, b][:, slots] = vb[:, lo:n].to(self.device, self.dtype)
            if release:
                keys[layer] = values[layer] = None
        for b in range(self.B):
            self.pool.n_pages[b] = pages[b]
            self._n[b] = counts[b]
        self._query = _stacked(query).to(self.device).clone()
        self._cur = 0
        self._prepare(self._bufs[0], self._query, count=False, wait=True)
        self._sync_device()
        return self.view()

    def prefetch(self) -> None:
        """Start preparing the other buffer for the next step from the latest query (speculative).

        Call right before the engine runs on ``view()``. No-op in quest mode.
        """
        self._check_started()
        if self.mode != "freekv":
            return
        if self._pending is not None:
            raise RuntimeError("prefetch() called twice without finish_step()")
        nxt = self._bufs[1 - self._cur]
        self._spec_query = self._query
        if self._cuda:
            self._cuda_init()
            self._cuda_state["stream"].wait_stream(torch.cuda.current_stream(self.device))
        if self._threaded:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtrt-freekv")
            self._pending = self._executor.submit(self._prepare, nxt, self._spec_query)
        else:
            fut: Future = Future()
            try:
                self._prepare(nxt, self._spec_query)
                fut.set_result(None)
            except BaseException as exc:  # surfaced by finish_step like the threaded path
                fut.set_exception(exc)
            self._pending = fut

    def finish_step(
        self,
        query: Sequence[Tensor] | Tensor,
        new_keys: Sequence[Tensor] | Tensor,
        new_values: Sequence[Tensor] | Tensor,
    ) -> KVView:
        """After the engine call: append the new token, correct drifted heads, swap buffers.

        ``query[l]`` ``[B, H, D]``, ``new_keys[l]``/``new_values[l]`` ``[B, Hkv, 1, D]`` (per-layer
        lists, or tensors with the layers stacked in front). Returns the view for the next step.
        """
        self._check_started()
        nxt = self._bufs[1 - self._cur]
        q = _stacked(query).to(self.device).clone()
        speculative = self._pending is not None
        if speculative:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()
            self._sync_device()
            self._stat["wait_s"] += time.perf_counter() - t0
        self._append_token(new_keys, new_values, nxt if speculative else None)
        t0 = time.perf_counter()
        if speculative:
            corr = self._needs_correction(q, self._spec_query)  # [L, B, Hkv]
            self._stat["heads_checked"] += corr.numel()
            n_corr = int(corr.sum())
            self._stat["heads_corrected"] += n_corr
            if n_corr:
                with self._stream_ctx(wait=True):
                    fresh = self._select(q, nxt)
                    self._recall(nxt, torch.where(corr[..., None], fresh, nxt.slot_pages))
                self._sync_device()
            # nxt's mask is current: the worker set it, _append_token marked the new token's slot,
            # and a correction only swaps pages within the live page slots
            self._stat["correction_s"] += time.perf_counter() - t0
        else:
            self._prepare(nxt, q, wait=True)
            self._sync_device()
            self._stat["sync_prepare_s"] += time.perf_counter() - t0
        self._query = q
        self._spec_query = None
        self._cur = 1 - self._cur
        self._stat["steps"] += 1
        return self.view()

    def select(self, query: Sequence[Tensor] | Tensor) -> KVView:
        """Re-select the *current* view in place with ``query`` (Quest: the current step's query).

        Only missing pages are recalled. Not allowed while a prefetch is in flight.
        """
        self._check_started()
        if self._pending is not None:
            raise RuntimeError("select() while a prefetch is in flight; call it before prefetch()")
        q = _stacked(query).to(self.device).clone()
        self._prepare(self.view(), q, wait=True)
        self._sync_device()
        self._query = q
        return self.view()

    def fresh_selection(self, layer: int, query: Tensor, buffer: KVView | None = None) -> Tensor:
        """What a fresh top-k selection with ``query`` ``[B, H, D]`` picks for ``layer`` ``[B, Hkv, k]``
        against ``buffer``'s pool snapshot (default: the current view)."""
        buf = buffer or self.view()
        n_pages = torch.tensor(buf.n_pages, dtype=torch.long)
        return self.pool.select(layer, query, self.k, self.combine, n_pages=n_pages)

    @property
    def nbytes(self) -> int:
        """Bytes this manager holds: the stored KV plus both views."""
        return self.stored_nbytes + self.view_nbytes

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the stored KV: host pool (with its summaries) and the sink/recent master copy."""
        return _nbytes(self._mk, self._mv, self.pool.data, self.pool.kmin, self.pool.kmax)

    @property
    def view_nbytes(self) -> int:
        """Bytes of the two double-buffered views the engine reads (fixed by the budget)."""
        return _nbytes(*(t for buf in self._bufs for t in (buf.all_keys, buf.all_values)))

    def stats(self) -> dict:
        """Run statistics since ``start`` (see the module docstring)."""
        s = dict(self._stat)
        steps = max(1, s["steps"])
        s["correction_rate"] = s["heads_corrected"] / s["heads_checked"] if s["heads_checked"] else 0.0
        s["page_hit_rate"] = s["pages_hit"] / s["pages_selected"] if s["pages_selected"] else 1.0
        s["recalled_bytes"] = s["pages_recalled"] * self.pool.page_nbytes
        s["recalled_bytes_per_step"] = s["recalled_bytes"] / steps
        s["pages_recalled_per_step"] = s["pages_recalled"] / steps
        s["wait_s_per_step"] = s["wait_s"] / steps
        s["pool_pages"] = self.pool.n_pages.tolist()
        s["budget"], s["k_pages"], s["slots"] = self.budget, self.k, self.slots
        s["stored_bytes"], s["view_bytes"] = self.stored_nbytes, self.view_nbytes
        return s

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
    def _reset_stats(self) -> None:
        self._stat = dict(steps=0, heads_checked=0, heads_corrected=0, pages_selected=0, pages_hit=0,
                          pages_recalled=0, tokens_copied=0, wait_s=0.0, correction_s=0.0, sync_prepare_s=0.0)

    def _check_started(self) -> None:
        if self._query is None:
            raise RuntimeError("call start() with the prefilled KV before decoding")

    def _drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            finally:
                self._sync_device()

    def _master_slots(self, idx: Tensor) -> Tensor:
        """Slots of tokens ``idx`` in the master sink+ring store."""
        return torch.where(idx < self.S, idx, self.S + (idx - self.S) % self.R)

    def _view_slots(self, idx: Tensor) -> Tensor:
        """Slots of (sink or recent) tokens ``idx`` in a view."""
        return torch.where(idx < self.S, idx, self.ring_off + (idx - self.S) % self.R)

    def _select(self, query: Tensor, buf: KVView) -> Tensor:
        """Top-k pages ``[L, B, Hkv, k]`` for ``query`` ``[L, B, H, D]`` within ``buf``'s pool snapshot."""
        n_pages = torch.tensor(buf.n_pages, dtype=torch.long)
        return self.pool.select(None, query, self.k, self.combine, n_pages=n_pages)

    def _prepare(self, buf: KVView, query: Tensor, count: bool = True, wait: bool = False) -> None:
        """Bring ``buf`` up to date: pool snapshot, missing tokens, top-k pages for ``query``, mask.

        On CUDA everything is queued on the copy stream (``wait``: after the work already queued
        on the caller's stream; the worker does not wait, ``prefetch`` ordered it already).
        """
        with self._stream_ctx(wait=wait):
            buf.n_pages = self.pool.n_pages.tolist()
            self._sync_tokens(buf)
            self._recall(buf, self._select(query, buf), count=count)
            self._update_mask(buf)

    def _sync_tokens(self, buf: KVView) -> None:
        """Copy into ``buf`` the sink/recent tokens it lacks (tokens in its pool snapshot are skipped)."""
        for b in range(self.B):
            lo_ring = self.S + buf.n_pages[b] * self.page
            idx = torch.arange(buf.length[b], self._n[b])
            idx = idx[(idx < self.S) | (idx >= lo_ring)]
            buf.length[b] = self._n[b]
            if not idx.numel():
                continue
            src, dst = self._master_slots(idx).to(self.device), self._view_slots(idx).to(self.device)
            buf.all_keys[:, b][:, :, dst] = self._mk[:, b][:, :, src]
            buf.all_values[:, b][:, :, dst] = self._mv[:, b][:, :, src]
            self._stat["tokens_copied"] += int(idx.numel())

    def _recall(self, buf: KVView, sel: Tensor, count: bool = True) -> None:
        """Make ``buf``'s page slots hold the pages ``sel`` ``[L, B, Hkv, k]`` (``-1`` = none).

        Pages already resident stay in their slot; missing pages go to the free slots in
        ascending slot order; only those are copied.
        """
        smap = buf.slot_pages
        sel = sel.to(smap.device)
        valid = sel >= 0
        present = (sel[..., :, None] == smap[..., None, :]).any(-1) & valid  # over sel entries
        missing = valid & ~present
        keep = (smap[..., :, None] == sel[..., None, :]).any(-1) & (smap >= 0)  # over slots
        n_miss = missing.sum(-1, keepdim=True)
        rank = torch.arange(self.k, device=smap.device) < n_miss  # first n_miss of each ordering
        miss_order = torch.argsort((~missing).to(torch.int8), dim=-1, stable=True)
        free_order = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)  # free slots first, ascending
        pages = torch.gather(sel, -1, miss_order)[rank]
        slots = free_order[rank]
        li, bi, hi = torch.nonzero(rank, as_tuple=True)[:3]  # row-major: sorted by layer
        new_map = torch.where(keep, smap, torch.full_like(smap, -1))
        new_map[li, bi, hi, slots] = pages
        if count:
            self._stat["pages_selected"] += int(valid.sum())
            self._stat["pages_hit"] += int(present.sum())
            self._stat["pages_recalled"] += int(pages.numel())
        if self.copy_chunk >= self.L:
            self._copy_pages(buf, li, bi, hi, slots, pages)
        else:
            bounds = torch.searchsorted(li, torch.arange(0, self.L + self.copy_chunk, self.copy_chunk,
                                                         device=li.device)).tolist()
            for a, z in zip(bounds[:-1], bounds[1:]):
                self._copy_pages(buf, li[a:z], bi[a:z], hi[a:z], slots[a:z], pages[a:z])
        smap.copy_(new_map)

    def _copy_pages(self, buf: KVView, li: Tensor, bi: Tensor, hi: Tensor, slots: Tensor, pages: Tensor) -> None:
        m = int(pages.numel())
        if m and not self._cuda:
            # whole-page block copies: one index_select of the pages (K and V) from the pool, then
            # one index_put_ into the view's page slots seen as [L*B*Hkv, k, 2, page*D] blocks
            # (a third faster than row-wise index_copy_; one op for K and V: 1.9 -> 1.6 ms/step at
            # ~475 pages)
            src = ((li * self.B + bi) * self.pool.capacity + pages) * self.Hkv + hi
            blk = self.pool.data.view(-1, 2, self.page * self.D).index_select(0, src)  # [M, 2, page*D]
            head = (li * self.B + bi) * self.Hkv + hi
            self._page_blocks(buf).index_put_((head, slots), blk)
        elif m:
            shape = (self.L, self.B, self.Hkv, self.k, self.page, self.D)
            pk = buf.all_keys[:, :, :, self.S : self.ring_off].view(shape)
            pv = buf.all_values[:, :, :, self.S : self.ring_off].view(shape)
            self._copy_pages_cuda(pk, pv, li, bi, hi, slots, pages)
        if self.copy_hook is not None:
            self.copy_hook(m)

    def _page_blocks(self, buf: KVView) -> Tensor:
        """The page region of ``buf`` as ``[L*B*Hkv, k, 2, page*D]`` blocks (a page slot's K, then its V)."""
        kv = buf.all_kv
        per_head = (self.slots + self.staging) * self.D
        return kv.view(-1).as_strided((self.L * self.B * self.Hkv, self.k, 2, self.page * self.D),
                                      (per_head, self.page * self.D, kv.stride(0), 1),
                                      kv.storage_offset() + self.S * self.D)

    def _copy_pages_cuda(self, pk, pv, li, bi, hi, slots, pages) -> None:
        """Gather on the host into pinned staging, DMA on the copy stream, scatter on the device."""
        st = self._cuda_state
        m = int(pages.numel())
        li_c, bi_c, hi_c, pg_c = li.cpu(), bi.cpu(), hi.cpu(), pages.cpu()
        cap = self.pool.capacity
        flat = self.pool.data.view(-1, 2, self.page, self.D)
        row = ((li_c * self.B + bi_c) * cap + pg_c) * self.Hkv + hi_c
        if st["host"].shape[0] < m:
            st["host"] = torch.empty((m, 2, self.page, self.D), dtype=self.dtype, pin_memory=True)
            st["dev"] = torch.empty((m, 2, self.page, self.D), dtype=self.dtype, device=self.device)
        host, dev = st["host"][:m], st["dev"][:m]
        torch.index_select(flat, 0, row, out=host)
        with torch.cuda.stream(st["stream"]):
            dev.copy_(host, non_blocking=True)
            pk[li, bi, hi, slots] = dev[:, 0]
            pv[li, bi, hi, slots] = dev[:, 1]
        st["stream"].synchronize()  # the pinned staging buffer is reused by the next copy

    def _update_mask(self, buf: KVView) -> None:
        m = torch.zeros((self.B, self.slots + self.staging), dtype=torch.bool)
        m[:, self.slots:] = True  # the staging slot holds this step's own K/V
        for b in range(self.B):
            n, npg = self._n[b], buf.n_pages[b]
            m[b, : min(self.S, n)] = True
            m[b, self.S : self.S + min(self.k, npg) * self.page] = True
            lo = self.S + npg * self.page
            if n > lo:
                m[b, self._view_slots(torch.arange(lo, n))] = True
        buf.mask.copy_(m.to(buf.mask.dtype), non_blocking=self._cuda)

    def _append_token(self, new_keys: Sequence[Tensor] | Tensor, new_values: Sequence[Tensor] | Tensor,
                      buf: KVView | None) -> None:
        """Write the step's token into the master store (and ``buf``); spill a full page to the pool."""
        k = _stacked(new_keys)[:, :, :, -1].to(self.device, self.dtype)  # [L, B, Hkv, D]
        v = _stacked(new_values)[:, :, :, -1].to(self.device, self.dtype)
        for b in range(self.B):
            idx = self._n[b]
            ms = idx if idx < self.S else self.S + (idx - self.S) % self.R
            self._mk[:, b, :, ms] = k[:, b]
            self._mv[:, b, :, ms] = v[:, b]
            if buf is not None:
                vs = idx if idx < self.S else self.ring_off + (idx - self.S) % self.R
                buf.all_keys[:, b, :, vs] = k[:, b]
                buf.all_values[:, b, :, vs] = v[:, b]
                buf.mask[b, vs] = 1  # the newest token is always live (sink or ring)
                if buf.length[b] == idx:
                    buf.length[b] = idx + 1
            self._n[b] = idx + 1
            lo = self.S + int(self.pool.n_pages[b]) * self.page
            if self._n[b] - lo >= self.R:  # ring full: its oldest page leaves the window
                slots = self._master_slots(torch.arange(lo, lo + self.page)).to(self.device)
                self.pool.append(b, self._mk[:, b][:, :, slots].cpu(), self._mv[:, b][:, :, slots].cpu())

    def _needs_correction(self, q: Tensor, q_spec: Tensor) -> Tensor:
        """``[L, B, Hkv]`` bool: heads whose group-mean cos(q_t, q_{t-1}) is below ``tau``."""
        shape = (self.L, self.B, self.Hkv)
        if self.tau >= 1.0:
            return torch.ones(shape, dtype=torch.bool, device=q.device)
        if self.tau <= 0.0:
            return torch.zeros(shape, dtype=torch.bool, device=q.device)
        return _cos_per_kv_head(q, q_spec, self.Hkv) < self.tau

    # ------------------------------------------------------------------ CUDA helpers (lazy)
    def _cuda_init(self) -> None:
        if self._cuda_state is None:
            self._cuda_state = {
                "stream": torch.cuda.Stream(device=self.device),
                "event": torch.cuda.Event(),
                "host": torch.empty((0, 2, self.page, self.D), dtype=self.dtype),
                "dev": None,
            }

    def _stream_ctx(self, wait: bool = False):
        if not self._cuda:
            return contextlib.nullcontext()
        self._cuda_init()
        stream = self._cuda_state["stream"]
        if wait:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(stream)

    def _sync_device(self) -> None:
        """Block until the copy stream's queued recall is done (an event recorded behind it)."""
        if self._cuda and self._cuda_state is not None:
            event = self._cuda_state["event"]
            event.record(self._cuda_state["stream"])
            event.synchronize()


__all__ = [
    "DEFAULT_BUDGET", "DEFAULT_PAGE", "DEFAULT_SINK", "DEFAULT_WINDOW", "DEFAULT_TAU", "DEFAULT_COMBINE",
    "RetrievalConfig", "build_retrieval", "FreeKVRetrieval", "KVView",
]
