"""Host page pool for KV retrieval (FreeKV / Quest): fixed-size pages, key summaries, page scores.

Arrays are numpy on the CPU and torch tensors on a GPU (``backend.py``): the functions below take
either and answer in the same kind.

A sequence's *middle* tokens (after the attention sink, before the recent window) live here in
fixed pages of ``page`` tokens (default 32). Per layer the pool is one tensor

    data[layer]  [B, capacity, Hkv, 2, page, D]     (one KV head's page: its K then its V, contiguous)

(all layers are one ``[L, B, capacity, Hkv, 2, page, D]`` array)

so recalling "page p of KV head h" is a single contiguous ``2*page*D`` block (FreeKV's
head-major host layout: no fragmented transfers). Each page carries a summary of its keys,

    kmin[layer], kmax[layer]  [B, Hkv, capacity, D]  (per-channel min / max over the page's keys)

kept on ``summary_device`` (the view device, so selection runs next to the queries) in float16, rounded
outward (``kmin`` down, ``kmax`` up, so the page score below stays an upper bound): half the bytes every
selection reads; scores are computed in float32 from them.
Pages are append-only; ``n_pages[b]`` counts the pages of sequence ``b`` (sequences of a batch
may hold different numbers of pages). The capacity doubles on demand (host memory, never bound
to an engine buffer, so reallocation is fine; it only happens between decode steps).

Scoring (Quest's upper bound of ``q . k`` over a page): for query head ``i`` of a KV group,

    s_i(p) = sum_d max(q_id * kmax_pd, q_id * kmin_pd)  =  q_i^+ . kmax_p + q_i^- . kmin_p

(the right-hand form, with ``q^+ = max(q, 0)`` and ``q^- = min(q, 0)``, is two matmuls). The
query heads of a KV group are combined into one score per (KV head, page):

* ``combine="softmax"`` (default, FreeKV's accuracy setting): softmax over pages of each query
  head's ``s_i / sqrt(D)`` (the attention logit scale), then mean over the group's heads;
* ``combine="mean"``: plain mean of ``s_i`` over the group's heads.

Then the top-k pages per (sequence, KV head) are taken in one top-k op (no Python loop over
pages). Pages that do not exist for a sequence score ``-inf`` and come back as ``-1``.

Storage precision (``pool_dtype``): ``fp32`` (this class's default; a ``freekv:`` spec's is ``fp16``) keeps pages in the KV's own dtype, exact;
``fp16`` in half precision; ``int8`` as 8-bit codes ``q`` with an affine map ``x = lo + q * step``
(``step = (hi - lo) / 255``, round to nearest, so ``|x - x'| <= step / 2``). The int8 granules
(``INT8_SCHEMES``): keys and values per channel within a page (for the keys ``lo``/``hi`` are then
exactly the page's ``kmin``/``kmax`` summaries: no extra bytes; the values' ``lo``/``step`` are
stored in float32 per channel, 1/8 of the codes' bytes at page=32). Pages are dequantized into the view dtype as they are recalled; the
summaries are always computed from the unrounded keys (for int8 keys per channel the codes use the stored,
outward-rounded summaries as their range, so every key is inside it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..cpu_kernels import page_ops
from .backend import backend_for, backend_of
from .page_select import select_pages_host

Tensor = Any  # a numpy array (CPU) or a torch tensor (GPU), see ``backend.py``

COMBINES = ("softmax", "mean")
#: pages per span summary (``PagePool.smin``/``smax``): FreeKV's cover test searches spans, then their pages
SPAN_PAGES = 16
POOL_DTYPES = ("fp32", "fp16", "int8")
#: int8 granules (keys, values): ``page`` one ``lo``/``step`` per page block, ``channel`` one per
#: channel over the page's tokens, ``token`` one per token over its channels. The default
#: ``("channel", "channel")`` measured best on SmolLM2's KV, see ``docs/freekv.md``.
INT8_SCHEMES = {"page": (-2, -1), "channel": (-2,), "token": (-1,)}
INT8_DEFAULT = ("channel", "channel")


def summarize(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (min, max) over the token axis ``-2`` of ``keys`` ``[..., page, D]`` -> ``[..., D]``."""
    xp = backend_of(keys)
    return xp.amin(keys, -2), xp.amax(keys, -2)


def outward_fp16(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``lo``/``hi`` (float32, numpy or torch) as float16 rounded outward: the nearest float16 at or below
    ``lo`` and at or above ``hi`` (clipped to float16's finite range), so a bound computed from them still
    bounds."""
    top = float(np.finfo(np.float16).max)
    if isinstance(lo, np.ndarray):
        lo16, hi16 = lo.astype(np.float16), hi.astype(np.float16)
        lo16 = np.where(lo16.astype(np.float32) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
        hi16 = np.where(hi16.astype(np.float32) < hi, np.nextafter(hi16, np.float16(np.inf)), hi16)
        return np.clip(lo16, -top, top), np.clip(hi16, -top, top)
    import torch

    lo16, hi16 = lo.to(torch.float16), hi.to(torch.float16)
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, -float("inf"))), lo16)
    hi16 = torch.where(hi16.float() < hi, torch.nextafter(hi16, torch.full_like(hi16, float("inf"))), hi16)
    return lo16.clamp(-top, top), hi16.clamp(-top, top)


def page_scores(query: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Quest upper-bound scores ``[..., B, H, P]`` of each query head against each page.

    ``query`` ``[..., B, H, D]`` (query head ``h`` belongs to KV head ``h // (H // Hkv)``),
    ``kmin``/``kmax`` ``[..., B, Hkv, P, D]`` (the same leading dims, e.g. layers, or none).
    Computed in float32 as two batched matmuls.
    """
    xp = backend_of(kmin)
    *lead, h, d = query.shape
    hkv = kmin.shape[-3]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    q = xp.astype(query, xp.float32).reshape(*lead, hkv, h // hkv, d)
    scores = xp.clamp(q, lo=0) @ xp.swapaxes(xp.astype(kmax, xp.float32), -1, -2)
    scores = scores + xp.clamp(q, hi=0) @ xp.swapaxes(xp.astype(kmin, xp.float32), -1, -2)
    return scores.reshape(*lead, h, scores.shape[-1])


def group_scores(
    scores: Tensor,
    n_kv_heads: int,
    combine: str = "softmax",
    valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Combine per-query-head page scores ``[..., B, H, P]`` into per-KV-head scores ``[..., B, Hkv, P]``.

    ``valid`` ``[B, P]`` (bool) marks the pages that exist; the others get ``-inf`` (so they
    always lose against a real page, even one whose softmax probability underflows to 0).
    ``scale`` multiplies the scores before the softmax (:func:`select_pages` passes ``1/sqrt(D)``,
    the attention logit scale); default 1.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}; use one of {', '.join(COMBINES)}")
    xp = backend_of(scores)
    *lead, h, p = scores.shape
    g = scores.reshape(*lead, n_kv_heads, h // n_kv_heads, p)
    invalid = None if valid is None else ~xp.astype(valid, xp.bool)[:, None, None, :]  # [B, 1, 1, P]
    if combine == "softmax":
        logits = g * (1.0 if scale is None else scale)
        if invalid is not None:
            logits = xp.where(invalid, float("-inf"), logits)
        probs = xp.nan_to_num(xp.softmax(logits, -1))  # rows with no page at all -> 0
        out = probs.mean(-2)
    else:
        out = g.mean(-2)
    if invalid is not None:
        out = xp.where(invalid[:, :, 0, :], float("-inf"), out)
    return out


def topk_pages(scores: Tensor, k: int) -> Tensor:
    """Indices ``[..., k]`` (int64) of the ``k`` best pages along the last dim of ``scores`` ``[..., P]``.

    Missing entries (fewer than ``k`` pages, or pages scored ``-inf``) are ``-1``, at the end.
    """
    xp = backend_of(scores)
    p = scores.shape[-1]
    out = xp.full((*scores.shape[:-1], k), -1, xp.int64)
    kk = min(k, p)
    if kk == 0:
        return out
    values, idx = xp.topk(scores, kk)
    out[..., :kk] = xp.where(xp.isneginf(values), -1, idx)
    return out


def select_pages(
    query: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    n_pages: Tensor,
    k: int,
    combine: str = "softmax",
) -> Tensor:
    """Top-``k`` pages per (sequence, KV head) for ``query`` ``[..., B, H, D]``: ``[..., B, Hkv, k]``.

    ``kmin``/``kmax`` ``[..., B, Hkv, P, D]`` hold at least ``max(n_pages)`` pages; ``n_pages`` ``[B]``
    says how many exist per sequence (pages ``>= n_pages[b]`` are never selected). Missing
    entries are ``-1``. Leading dims (e.g. layers) are selected independently in one call.
    """
    xp = backend_of(kmin)
    *lead, bsz, _, d = query.shape
    hkv = kmin.shape[-3]
    n_pages = xp.asarray(n_pages)
    p = int(n_pages.max()) if xp.size(n_pages) else 0
    if p == 0 or k == 0:
        return xp.full((*lead, bsz, hkv, k), -1, xp.int64)
    kmin, kmax = kmin[..., :p, :], kmax[..., :p, :]
    valid = xp.arange(p)[None, :] < n_pages[:, None]
    scores = page_scores(xp.asarray(query), kmin, kmax)
    combined = group_scores(scores, hkv, combine, valid, scale=1.0 / math.sqrt(d))
    return topk_pages(combined, k)


class PagePool:
    """Append-only host store of full pages for ``batch`` sequences and ``n_layers`` layers.

    ``data`` ``[L, B, cap, Hkv, 2, page, D]`` (``dtype``, on the host, pinned if ``pin_memory``;
    ``data[l]`` is layer ``l``); ``kmin``/``kmax`` ``[L, B, Hkv, cap, D]`` float16 (``outward_fp16``) on ``summary_device``
    (page-minor, so scoring is a plain batched matmul); ``n_pages`` ``[B]`` int64 (host). All layers
    live in one array so selection and recall run as a few batched ops per step instead of a few
    per layer. ``summary_device`` "cpu" (numpy arrays throughout) or a CUDA device (torch tensors:
    the page store then stays in host torch memory, summaries on the device). ``dtype``: what pages
    are written from and read back as (a numpy or torch dtype, or its name; default float32).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        page: int = 32,
        dtype=None,
        *,
        capacity: int = 8,
        summary_device="cpu",
        pin_memory: bool = False,
        pool_dtype: str = "fp32",
        int8_scheme: tuple[str, str] = INT8_DEFAULT,
        backend=None,
    ) -> None:
        if page < 1:
            raise ValueError(f"page={page} must be at least 1")
        if pool_dtype not in POOL_DTYPES:
            raise ValueError(f"pool_dtype={pool_dtype!r}; use one of {', '.join(POOL_DTYPES)}")
        if int8_scheme[0] not in ("page", "channel") or int8_scheme[1] not in INT8_SCHEMES:
            raise ValueError(f"int8_scheme={int8_scheme!r}: keys page|channel, values page|channel|token")
        #: the summaries' (and selection's) arrays; ``host`` the page store's (the same on the CPU)
        self.xp = xp = backend if backend is not None else backend_for(summary_device)
        self.host = xp if not xp.is_cuda else type(xp)("cpu")
        if pool_dtype == "int8" and xp.is_cuda:
            raise ValueError("pool_dtype=int8 dequantizes pages on the host with their CPU summaries; "
                             "use pool_dtype=fp16 or fp32 on a CUDA device")
        self.n_layers, self.batch, self.n_kv_heads, self.head_dim = n_layers, batch, n_kv_heads, head_dim
        #: ``dtype``: what pages are written from and read back as (the view's); ``storage``: what they are kept in
        self.page, self.dtype, self.pool_dtype = page, xp.dtype("float32" if dtype is None else dtype), pool_dtype
        self.storage = {"fp32": self.dtype, "fp16": xp.dtype("float16"), "int8": xp.dtype("uint8")}[pool_dtype]
        self.int8_scheme = int8_scheme if pool_dtype == "int8" else None
        self.pin_memory = pin_memory
        #: the summaries' dtype: float16, rounded outward (``outward_fp16``)
        self.summary_dtype = "float16"
        self.n_pages = self.host.zeros((batch,), "int64")
        self._cap = 0
        self._touched = 0  # pages below this id may hold data or summaries (the rest was never written)
        self.data = self.kmin = self.kmax = None
        #: ``[L, B, Hkv, ceil(cap / span), D]``: the min / max of the page summaries over spans of ``span`` pages
        #: (the pages written so far of the last span), float16 like them: a span's bound bounds its pages'
        self.span = SPAN_PAGES
        self.smin = self.smax = None
        #: int8 only: ``lo``/``step`` ``[L, B, cap, Hkv, 2, a, c]`` of the keys (``None`` when they come
        #: from the summaries) and of the values, ``(a, c)`` the granule's broadcast shape
        self.kq: Tensor | None = None
        self.vq: Tensor | None = None
        self._alloc(max(1, capacity))

    # ------------------------------------------------------------------ storage
    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def page_nbytes(self) -> int:
        """Bytes a recall reads from the pool per KV head's page: its K and V (with their int8 scales)."""
        nbytes = 2 * self.page * self.head_dim * self.storage.itemsize
        for q in (self.kq, self.vq):
            if q is not None:
                nbytes += self.host.nbytes(q[0, 0, 0, 0])
        return nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held: page store (with its int8 scales) and summaries, at the allocated capacity."""
        return sum(self.xp.nbytes(t) for t in (self.data, self.kmin, self.kmax, self.smin, self.smax, self.kq, self.vq)
                   if t is not None)

    def _granule(self, scheme: str) -> tuple[int, int]:
        """Broadcast shape ``(a, c)`` of one ``lo``/``step`` over a ``[page, D]`` block."""
        return {"page": (1, 1), "channel": (1, self.head_dim), "token": (self.page, 1)}[scheme]

    def _alloc(self, cap: int) -> None:
        L, b, h, d, pg = self.n_layers, self.batch, self.n_kv_heads, self.head_dim, self.page
        xp, host = self.xp, self.host
        # only written pages are ever read (`select_pages` masks pages >= n_pages before its softmax), so
        # neither the page store nor the summaries need a zero fill: their memory is touched as pages arrive
        data = host.empty((L, b, cap, h, 2, pg, d), self.storage, pin_memory=self.pin_memory)
        kmin = xp.empty((L, b, h, cap, d), self.summary_dtype)
        kmax = xp.empty((L, b, h, cap, d), self.summary_dtype)
        spans = -(-cap // self.span)
        smin = xp.empty((L, b, h, spans, d), self.summary_dtype)
        smax = xp.empty((L, b, h, spans, d), self.summary_dtype)
        kq = vq = None
        if self.int8_scheme is not None:
            if self.int8_scheme[0] != "channel":  # keys per channel: lo/hi are the summaries
                kq = host.empty((L, b, cap, h, 2, *self._granule(self.int8_scheme[0])), "float32")
            vq = host.empty((L, b, cap, h, 2, *self._granule(self.int8_scheme[1])), "float32")
        live = self._touched  # only the pages written so far (data or summaries) move over
        if live:
            data[:, :, :live] = self.data[:, :, :live]
            kmin[:, :, :, :live] = self.kmin[:, :, :, :live]
            kmax[:, :, :, :live] = self.kmax[:, :, :, :live]
            smin[:, :, :, :-(-live // self.span)] = self.smin[:, :, :, :-(-live // self.span)]
            smax[:, :, :, :-(-live // self.span)] = self.smax[:, :, :, :-(-live // self.span)]
            for new, old in ((kq, self.kq), (vq, self.vq)):
                if new is not None:
                    new[:, :, :live] = old[:, :, :live]
        self.data, self.kmin, self.kmax, self.smin, self.smax, self._cap = data, kmin, kmax, smin, smax, cap
        self.kq, self.vq = kq, vq

    def reserve(self, n_pages: int, exact: bool = False) -> None:
        """Make room for ``n_pages`` pages per sequence: exactly that many with ``exact`` (when the
        caller knows the final size), else the capacity doubles (amortised growth)."""
        if n_pages > self._cap:
            cap = n_pages if exact else self._cap
            while cap < n_pages:
                cap *= 2
            self._alloc(cap)

    def reset(self) -> None:
        """Forget every page (storage is kept; so are summaries stored ahead of ``n_pages``, which a
        prefill's ``summarize_pages`` writes before ``start`` resets and appends)."""
        self.n_pages[...] = 0

    # ------------------------------------------------------------------ writing
    def append(self, b: int, keys: Sequence[Tensor] | Tensor, values: Sequence[Tensor] | Tensor) -> range:
        """Append whole pages to sequence ``b``.

        ``keys``/``values``: per layer ``[Hkv, n*page, D]`` (a list: written one layer at a time, no stacked
        copy, as a prompt's are) or one ``[L, Hkv, n*page, D]`` array (a decode step's spilled page: every
        layer in one op). Returns the new page ids.
        """
        n_tok = keys[0].shape[-2]
        if n_tok % self.page:
            raise ValueError(f"{n_tok} tokens is not a whole number of {self.page}-token pages")
        n_new = n_tok // self.page
        p0 = int(self.n_pages[b])
        if n_new == 0:
            return range(p0, p0)
        self.reserve(p0 + n_new)
        if isinstance(keys, (list, tuple)) or self.int8_scheme is not None:
            for layer, (kl, vl) in enumerate(zip(list(keys), list(values))):
                self.write(layer, b, p0, kl, vl)
        else:
            self.write(slice(None), b, p0, keys, values)
        self.n_pages[b] = p0 + n_new
        return range(p0, p0 + n_new)

    def summarize_pages(self, layer: int | slice, b: int, first_page: int, keys: Tensor) -> None:
        """Store only the summaries of one layer's whole pages ``keys`` ``[Hkv, n*page, D]`` (or of a slice of
        layers, ``[L, Hkv, n*page, D]``) of sequence ``b`` at page ids ``first_page..`` (a prefill chunk's pages,
        before ``write`` stores their data with ``summarized`` set). Room must be reserved."""
        d, pg = self.head_dim, self.page
        n_new = keys.shape[-2] // pg
        k = self.xp.asarray(keys).reshape(*keys.shape[:-2], n_new, pg, d)  # [(L,) Hkv, n, page, D]
        lo, hi = summarize(self.xp.to_device(k, "float32"))  # [(L,) Hkv, n, D]
        lo, hi = outward_fp16(lo, hi)
        self.kmin[layer, b, :, first_page : first_page + n_new] = lo
        self.kmax[layer, b, :, first_page : first_page + n_new] = hi
        end, xp = first_page + n_new, self.xp
        for s in range(first_page // self.span, -(-end // self.span)):  # the spans these pages are in, up to them
            pages = slice(s * self.span, min(end, (s + 1) * self.span))
            self.smin[layer, b, :, s] = xp.amin(self.kmin[layer, b, :, pages], -2)
            self.smax[layer, b, :, s] = xp.amax(self.kmax[layer, b, :, pages], -2)
        self._touched = max(self._touched, end)

    def write(self, layer: int | slice, b: int, first_page: int, keys: Tensor, values: Tensor,
              summarized: int = 0) -> None:
        """Store one layer's whole pages ``keys``/``values`` ``[Hkv, n*page, D]`` (host arrays) of
        sequence ``b`` at page ids ``first_page..``, with their summaries (the first ``summarized`` of
        them already stored by ``summarize_pages``). Room must be reserved; ``n_pages`` is the
        caller's to advance once every layer is written (``append`` does both). ``layer`` a slice of
        layers (fp32/fp16 pools): ``keys``/``values`` ``[L, Hkv, n*page, D]``, written in one op each."""
        host = self.host
        h, d, pg = self.n_kv_heads, self.head_dim, self.page
        keys, values = host.asarray(keys), host.asarray(values)
        n_new = keys.shape[-2] // pg
        p0 = first_page
        dst = self.data[layer, b, p0 : p0 + n_new]  # [n, Hkv, 2, page, D]
        done = min(summarized, n_new)
        if done < n_new:
            self.summarize_pages(layer, b, p0 + done, keys[..., done * pg : n_new * pg, :])
        if isinstance(layer, slice):  # fp32 / fp16: [L, n, Hkv, 2, page, D] <- [L, Hkv, n, page, D]
            shape = (keys.shape[0], h, n_new, pg, d)
            dst[:, :, :, 0] = host.swapaxes(host.cast(keys, self.storage).reshape(shape), 1, 2)
            dst[:, :, :, 1] = host.swapaxes(host.cast(values, self.storage).reshape(shape), 1, 2)
            return
        if self.int8_scheme is None:  # fp32: exact; fp16: rounded to nearest (head by head: one head's copy)
            for head in range(h):
                dst[:, head, 0] = host.cast(keys[head], self.storage).reshape(n_new, pg, d)
                dst[:, head, 1] = host.cast(values[head], self.storage).reshape(n_new, pg, d)
            return
        k = host.swapaxes(keys.reshape(h, n_new, pg, d), 0, 1)  # [n, Hkv, page, D]
        v = host.swapaxes(values.reshape(h, n_new, pg, d), 0, 1)
        # from the unrounded keys (int8 pools are host-only: the summaries are host arrays)
        lo = host.astype(host.swapaxes(self.kmin[layer, b, :, p0 : p0 + n_new], 0, 1), "float32")  # [n, Hkv, D]
        hi = host.astype(host.swapaxes(self.kmax[layer, b, :, p0 : p0 + n_new], 0, 1), "float32")
        kscheme, vscheme = self.int8_scheme
        if kscheme == "channel":
            dst[:, :, 0] = _quantize(host, k, lo[:, :, None], hi[:, :, None])
        else:
            self.kq[layer, b, p0 : p0 + n_new] = _quantize_into(host, dst[:, :, 0], k, INT8_SCHEMES[kscheme])
        self.vq[layer, b, p0 : p0 + n_new] = _quantize_into(host, dst[:, :, 1], v, INT8_SCHEMES[vscheme])

    # ------------------------------------------------------------------ reading
    def page_rows(self, layers: Tensor, seqs: Tensor, heads: Tensor, pages: Tensor) -> Tensor:
        """Row of each (layer, sequence, KV head, page) in ``data`` seen as ``[rows, 2, page, D]``
        (one KV head's page, its K then its V, is one row)."""
        return ((layers * self.batch + seqs) * self._cap + pages) * self.n_kv_heads + heads

    def read(self, layers: Tensor, seqs: Tensor, heads: Tensor, pages: Tensor) -> Tensor:
        """The pages of (layer, sequence, KV head, page id) as ``[n, 2, page*D]`` rows in ``dtype``
        (K then V; dequantized from fp16/int8; with fp32 storage exactly the stored rows). Host
        index arrays in, a host array out."""
        host = self.host
        block = self.page * self.head_dim
        rows = self.page_rows(layers, seqs, heads, pages)
        if self.int8_scheme is None:
            return host.take_rows(host.reshape_view(self.data, (-1, 2, block)), rows, self.dtype)
        data = host.take(host.reshape_view(self.data, (-1, 2, block)), rows, 0)
        n, pg, d = len(rows), self.page, self.head_dim
        data = data.reshape(n, 2, pg, d)
        out = host.scratch((n, 2, pg, d), "float32")
        if self.kq is None:  # keys per channel: lo/hi are the summaries
            lo = host.astype(self.kmin[layers, seqs, heads, pages][:, None], "float32")  # [n, 1, D]
            step = (host.astype(self.kmax[layers, seqs, heads, pages][:, None], "float32") - lo) / 255
            host.addcmul(lo, data[:, 0], step, out=out[:, 0])
        else:
            kq = host.take(self.kq.reshape(-1, *self.kq.shape[4:]), rows, 0)
            host.addcmul(kq[:, 0], data[:, 0], kq[:, 1], out=out[:, 0])
        vq = host.take(self.vq.reshape(-1, *self.vq.shape[4:]), rows, 0)
        host.addcmul(vq[:, 0], data[:, 1], vq[:, 1], out=out[:, 1])
        return host.astype(out.reshape(n, 2, block), self.dtype)

    def page_kv(self, layer: int, b: int, page_id: int) -> tuple[Tensor, Tensor]:
        """Keys and values ``[Hkv, page, D]`` of one page, as recalled (dequantized into ``dtype``)."""
        h = self.host.arange(self.n_kv_heads)
        one = h * 0 + 1
        rows = self.read(one * layer, one * b, h, one * page_id).reshape(self.n_kv_heads, 2, self.page, self.head_dim)
        return rows[:, 0], rows[:, 1]

    def select(
        self, layer: int | slice | None, query: Tensor, k: int, combine: str = "softmax",
        n_pages: Tensor | None = None, threads: int = 1, only: Tensor | None = None,
    ) -> Tensor:
        """Top-``k`` page ids (``-1`` padded) among the first ``n_pages[b]`` pages.

        ``layer`` an int: ``query`` ``[B, H, D]`` -> ``[B, Hkv, k]``; a slice of layers or ``None`` (every
        layer) at once: ``query`` ``[L, B, H, D]`` -> ``[L, B, Hkv, k]``. ``only`` (bool, the output's shape
        without ``k``): rows left out come back all ``-1``. Summaries on the host are scored in C on
        ``threads`` threads (``cpu_kernels.page_ops``, only the rows asked for), else by one ONNX Runtime
        graph call (``page_select``); on a GPU by torch.
        """
        n = self.n_pages if n_pages is None else n_pages
        query = self.xp.asarray(query)
        kmin, kmax = (self.kmin, self.kmax) if layer is None else (self.kmin[layer], self.kmax[layer])
        if isinstance(kmin, np.ndarray):
            if page_ops.available():
                return page_ops.select(query, kmin, kmax, n, k, combine, only, threads)
            selected = select_pages_host(query, kmin, kmax, n, k, combine, threads)
        else:
            selected = select_pages(query, kmin, kmax, n, k, combine)
        return selected if only is None else self.xp.where(self.xp.asarray(only)[..., None], selected, -1)


def _quantize(xp, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """uint8 codes of ``x`` on the grid ``lo + q * (hi - lo) / 255`` (round to nearest)."""
    step = (hi - lo) / 255
    step = xp.where(step > 0, step, step * 0 + 1)  # a constant granule: q = 0 gives lo exactly
    return xp.astype(xp.clamp(xp.rint((xp.astype(x, "float32") - lo) / step), 0, 255), "uint8")


def _quantize_into(xp, dst: Tensor, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Write the uint8 codes of ``x`` ``[n, Hkv, page, D]`` into ``dst`` with one ``lo``/``hi`` per
    granule (reduced over ``dims``); returns ``[n, Hkv, 2, a, c]``: ``lo`` then ``step``."""
    x = xp.astype(x, "float32")
    lo, hi = xp.amin(x, dims, keepdims=True), xp.amax(x, dims, keepdims=True)
    dst[...] = _quantize(xp, x, lo, hi)
    return xp.stack((lo, (hi - lo) / 255), axis=2)
