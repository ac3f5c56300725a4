"""Host page pool for KV retrieval (FreeKV / Quest): fixed-size pages, key summaries, page scores.

A sequence's *middle* tokens (after the attention sink, before the recent window) live here in
fixed pages of ``page`` tokens (default 32). Per layer the pool is one tensor

    data[layer]  [B, capacity, Hkv, 2, page, D]     (one KV head's page: its K then its V, contiguous)

(all layers are one ``[L, B, capacity, Hkv, 2, page, D]`` tensor)

so recalling "page p of KV head h" is a single contiguous ``2*page*D`` block (FreeKV's
head-major host layout: no fragmented transfers). Each page carries a summary of its keys,

    kmin[layer], kmax[layer]  [B, Hkv, capacity, D]  (per-channel min / max over the page's keys)

kept in float32 on ``summary_device`` (the view device, so selection runs next to the queries).
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

Then the top-k pages per (sequence, KV head) are taken with ``torch.topk`` (no Python loop
over pages). Pages that do not exist for a sequence score ``-inf`` and come back as ``-1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

COMBINES = ("softmax", "mean")


def summarize(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (min, max) over the token axis ``-2`` of ``keys`` ``[..., page, D]`` -> ``[..., D]``."""
    return keys.amin(dim=-2), keys.amax(dim=-2)


def page_scores(query: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Quest upper-bound scores ``[..., B, H, P]`` of each query head against each page.

    ``query`` ``[..., B, H, D]`` (query head ``h`` belongs to KV head ``h // (H // Hkv)``),
    ``kmin``/``kmax`` ``[..., B, Hkv, P, D]`` (the same leading dims, e.g. layers, or none).
    Computed in float32 as two batched matmuls.
    """
    *lead, h, d = query.shape
    hkv = kmin.shape[-3]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    q = query.float().reshape(*lead, hkv, h // hkv, d)
    scores = q.clamp(min=0) @ kmax.float().transpose(-1, -2)
    scores = scores + q.clamp(max=0) @ kmin.float().transpose(-1, -2)
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
    *lead, h, p = scores.shape
    g = scores.reshape(*lead, n_kv_heads, h // n_kv_heads, p)
    invalid = None if valid is None else ~valid.to(torch.bool)[:, None, None, :]  # [B, 1, 1, P]
    if combine == "softmax":
        logits = g * (1.0 if scale is None else scale)
        if invalid is not None:
            logits = logits.masked_fill(invalid, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no page at all -> 0
        out = probs.mean(dim=-2)
    else:
        out = g.mean(dim=-2)
    if invalid is not None:
        out = out.masked_fill(invalid[:, :, 0, :], float("-inf"))
    return out


def topk_pages(scores: Tensor, k: int) -> Tensor:
    """Indices ``[..., k]`` (int64) of the ``k`` best pages along the last dim of ``scores`` ``[..., P]``.

    Missing entries (fewer than ``k`` pages, or pages scored ``-inf``) are ``-1``, at the end.
    """
    p = scores.shape[-1]
    out = torch.full((*scores.shape[:-1], k), -1, dtype=torch.long, device=scores.device)
    kk = min(k, p)
    if kk == 0:
        return out
    values, idx = torch.topk(scores, kk, dim=-1, largest=True, sorted=True)
    out[..., :kk] = torch.where(torch.isneginf(values), torch.full_like(idx, -1), idx)
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
    *lead, bsz, _, d = query.shape
    hkv = kmin.shape[-3]
    n_pages = n_pages.to(kmin.device)
    p = int(n_pages.max()) if n_pages.numel() else 0
    if p == 0 or k == 0:
        return torch.full((*lead, bsz, hkv, k), -1, dtype=torch.long, device=kmin.device)
    kmin, kmax = kmin[..., :p, :], kmax[..., :p, :]
    valid = torch.arange(p, device=kmin.device)[None, :] < n_pages[:, None]
    scores = page_scores(query.to(kmin.device), kmin, kmax)
    combined = group_scores(scores, hkv, combine, valid, scale=1.0 / math.sqrt(d))
    return topk_pages(combined, k)


class PagePool:
    """Append-only host store of full pages for ``batch`` sequences and ``n_layers`` layers.

    ``data`` ``[L, B, cap, Hkv, 2, page, D]`` (``dtype``, on CPU, pinned if ``pin_memory``; ``data[l]``
    is layer ``l``); ``kmin``/``kmax`` ``[L, B, Hkv, cap, D]`` float32 on ``summary_device``
    (page-minor, so scoring is a plain batched matmul);
    ``n_pages`` ``[B]`` int64 (CPU). All layers live in one tensor so selection and recall run as
    a few batched ops per step instead of a few per layer.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        page: int = 32,
        dtype: torch.dtype = torch.float32,
        *,
        capacity: int = 8,
        summary_device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> None:
        if page < 1:
            raise ValueError(f"page={page} must be at least 1")
        self.n_layers, self.batch, self.n_kv_heads, self.head_dim = n_layers, batch, n_kv_heads, head_dim
        self.page, self.dtype = page, dtype
        self.summary_device = torch.device(summary_device)
        self.pin_memory = pin_memory
        self.n_pages = torch.zeros(batch, dtype=torch.long)
        self._cap = 0
        self.data = self.kmin = self.kmax = None
        self._alloc(max(1, capacity))

    # ------------------------------------------------------------------ storage
    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def page_nbytes(self) -> int:
        """Bytes of one KV head's page (its K and V)."""
        return 2 * self.page * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def _alloc(self, cap: int) -> None:
        L, b, h, d, pg = self.n_layers, self.batch, self.n_kv_heads, self.head_dim, self.page
        # only appended pages are ever read, so the page store needs no zero fill
        data = torch.empty((L, b, cap, h, 2, pg, d), dtype=self.dtype, pin_memory=self.pin_memory)
        kmin = torch.zeros((L, b, h, cap, d), dtype=torch.float32, device=self.summary_device)
        kmax = torch.zeros((L, b, h, cap, d), dtype=torch.float32, device=self.summary_device)
        if self._cap:
            data[:, :, : self._cap] = self.data
            kmin[:, :, :, : self._cap] = self.kmin
            kmax[:, :, :, : self._cap] = self.kmax
        self.data, self.kmin, self.kmax, self._cap = data, kmin, kmax, cap

    def reserve(self, n_pages: int, exact: bool = False) -> None:
        """Make room for ``n_pages`` pages per sequence: exactly that many with ``exact`` (when the
        caller knows the final size), else the capacity doubles (amortised growth)."""
        if n_pages > self._cap:
            cap = n_pages if exact else self._cap
            while cap < n_pages:
                cap *= 2
            self._alloc(cap)

    def reset(self) -> None:
        """Forget every page (storage is kept)."""
        self.n_pages.zero_()

    # ------------------------------------------------------------------ writing
    def append(self, b: int, keys: Sequence[Tensor] | Tensor, values: Sequence[Tensor] | Tensor) -> range:
        """Append whole pages to sequence ``b``.

        ``keys``/``values``: per layer ``[Hkv, n*page, D]`` (a list, or one ``[L, Hkv, n*page, D]``
        tensor). Returns the new page ids.
        """
        keys, values = list(keys), list(values)  # per layer; written one layer at a time (no stacked copy)
        n_tok = keys[0].shape[-2]
        if n_tok % self.page:
            raise ValueError(f"{n_tok} tokens is not a whole number of {self.page}-token pages")
        n_new = n_tok // self.page
        p0 = int(self.n_pages[b])
        if n_new == 0:
            return range(p0, p0)
        self.reserve(p0 + n_new)
        for layer, (kl, vl) in enumerate(zip(keys, values)):
            self.write(layer, b, p0, kl, vl)
        self.n_pages[b] = p0 + n_new
        return range(p0, p0 + n_new)

    def write(self, layer: int, b: int, first_page: int, keys: Tensor, values: Tensor) -> None:
        """Store one layer's whole pages ``keys``/``values`` ``[Hkv, n*page, D]`` of sequence ``b`` at
        page ids ``first_page..``, with their summaries. Room must be reserved; ``n_pages`` is the
        caller's to advance once every layer is written (``append`` does both)."""
        h, d, pg = self.n_kv_heads, self.head_dim, self.page
        n_new = keys.shape[-2] // pg
        p0 = first_page
        k = keys.reshape(h, n_new, pg, d).transpose(0, 1)  # [n, Hkv, page, D]
        dst = self.data[layer, b, p0 : p0 + n_new]  # [n, Hkv, 2, page, D]
        dst[:, :, 0].copy_(k)
        dst[:, :, 1].copy_(values.reshape(h, n_new, pg, d).transpose(0, 1))
        lo, hi = summarize(k.to(self.summary_device, torch.float32))  # [n, Hkv, D]
        self.kmin[layer, b, :, p0 : p0 + n_new] = lo.transpose(0, 1)
        self.kmax[layer, b, :, p0 : p0 + n_new] = hi.transpose(0, 1)

    # ------------------------------------------------------------------ reading
    def page_rows(self, layers: Tensor, seqs: Tensor, heads: Tensor, pages: Tensor) -> Tensor:
        """Row of each (layer, sequence, KV head, page) in ``data`` seen as ``[rows, 2, page, D]``
        (one KV head's page, its K then its V, is one row)."""
        return ((layers * self.batch + seqs) * self._cap + pages) * self.n_kv_heads + heads

    def page_kv(self, layer: int, b: int, page_id: int) -> tuple[Tensor, Tensor]:
        """Keys and values ``[Hkv, page, D]`` of one page."""
        blk = self.data[layer, b, page_id]
        return blk[:, 0], blk[:, 1]

    def select(
        self, layer: int | None, query: Tensor, k: int, combine: str = "softmax", n_pages: Tensor | None = None
    ) -> Tensor:
        """Top-``k`` page ids (``-1`` padded) among the first ``n_pages[b]`` pages.

        ``layer`` an int: ``query`` ``[B, H, D]`` -> ``[B, Hkv, k]``; ``layer=None``: every layer at
        once, ``query`` ``[L, B, H, D]`` -> ``[L, B, Hkv, k]``.
        """
        n = self.n_pages if n_pages is None else n_pages
        if layer is None:
            return select_pages(query, self.kmin, self.kmax, n, k, combine)
        return select_pages(query, self.kmin[layer], self.kmax[layer], n, k, combine)
