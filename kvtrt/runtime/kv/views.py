"""The fixed view buffers a retrieval decode binds: sink, selected pages and recent ring per KV head."""

from __future__ import annotations

import numpy as np

from .layout import ViewLayout
from .pages import PagePool, Tensor


#: pages recalled per gather-and-put in ``KVView.put_pages`` (a few MB of staging each)
RECALL_RUN = 256


class KVView:
    """One of the two fixed view buffers of a ``FreeKVRetrieval``, laid out by ``layout``.

    ``keys[l]``/``values[l]`` ``[B, Hkv, slots + staging, D]`` (contiguous; slices of ``all_keys`` /
    ``all_values`` ``[L, ...]``, themselves the two halves of one ``all_kv`` ``[2, L, ...]``, so a
    recalled page's K and V are written by one copy) and ``mask`` ``[B, slots + staging]`` are
    allocated once and only ever filled in place. The staging slot (if any) is always live: an
    in-place graph writes the step's new K/V there and the runtime files it afterwards.
    ``slot_pages`` ``[L, B, Hkv, k_pages]`` is the page id held by each page slot (``-1`` empty);
    ``n_pages[b]`` is the pool snapshot this buffer was prepared against (its ring covers tokens
    from ``layout.first_unpaged(n_pages[b])``); ``length[b]`` counts the tokens it has received.
    """

    def __init__(self, index: int, layout: ViewLayout, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
                 dtype, xp, mask_dtype):
        """``xp``: the backend (``backend.py``) the buffers live in; ``dtype``/``mask_dtype`` its dtypes."""
        self.index = index
        self.layout = layout
        self.xp = xp
        width = layout.slots + layout.staging
        # not zeroed here: `clear()` fills it once `start` has moved (and released) the prompt's KV, so
        # its pages are first touched after the dense store is gone (no peak of both)
        self.all_kv = xp.empty((2, n_layers, batch, n_kv_heads, width, head_dim), dtype)
        self.all_keys, self.all_values = self.all_kv[0], self.all_kv[1]
        self.keys = [self.all_keys[layer] for layer in range(n_layers)]
        self.values = [self.all_values[layer] for layer in range(n_layers)]
        self.mask = xp.zeros((batch, width), mask_dtype)
        self.slot_pages = xp.full((n_layers, batch, n_kv_heads, layout.k_pages), -1, "int64")
        self.n_pages = [0] * batch
        self.length = [0] * batch

    def clear(self) -> None:
        """Zero the K/V (slots that hold no token must be finite: masked, they are still multiplied by 0)."""
        self.all_kv[...] = 0

    def reset(self) -> None:
        self.slot_pages[...] = -1
        self.mask[...] = 0
        self.n_pages = [0] * len(self.n_pages)
        self.length = [0] * len(self.length)

    @property
    def nbytes(self) -> int:
        return self.xp.nbytes(self.all_kv)

    def page_region(self) -> tuple[Tensor, Tensor]:
        """Keys and values of the page slots, each ``[L, B, Hkv, k_pages, page, D]``."""
        lay = self.layout
        shape = (*self.all_keys.shape[:3], lay.k_pages, lay.page, self.all_keys.shape[-1])
        return (self.xp.reshape_view(self.all_keys[:, :, :, lay.sink:lay.ring_start], shape),
                self.xp.reshape_view(self.all_values[:, :, :, lay.sink:lay.ring_start], shape))

    def put_pages(self, pool: PagePool, layers: Tensor, seqs: Tensor, heads: Tensor, slots: Tensor,
                  pages: Tensor) -> None:
        """Copy pool pages ``pages`` into page slots ``slots`` of (layer, sequence, KV head) on the host:
        one gather of whole pages (K and V) from the pool (dequantized from an fp16/int8 pool), one
        indexed write into the page slots seen as ``[2, L*B*Hkv, k_pages, page*D]`` blocks (block
        copies beat row-wise copies)."""
        lay, xp = self.layout, self.xp
        n_layers, batch, n_kv_heads, width, head_dim = self.all_keys.shape
        block = lay.page * head_dim
        rows = xp.reshape_view(self.all_kv, (2, n_layers * batch * n_kv_heads, width * head_dim))
        blocks = xp.reshape_view(rows[:, :, lay.sink * head_dim:lay.ring_start * head_dim],
                                 (2, n_layers * batch * n_kv_heads, lay.k_pages, block))
        owners = (layers * batch + seqs) * n_kv_heads + heads
        # in bounded runs: a whole view's recall (the first one) would otherwise stage every page twice
        # (in the pool's dtype, then in the view's) beside the view, at the sequence's peak of KV memory
        for i in range(0, len(pages), RECALL_RUN):
            run = slice(i, i + RECALL_RUN)
            kv = pool.read(layers[run], seqs[run], heads[run], pages[run])  # [n, 2, page*D]
            blocks[:, owners[run], slots[run]] = xp.swapaxes(kv, 0, 1)

    def copy_unpaged(self, master_keys: Tensor, master_values: Tensor, lengths: list[int]) -> int:
        """Copy from the master copy the sink/recent tokens this view lacks (tokens inside its pool
        snapshot are skipped); returns how many tokens were copied per (layer, KV head)."""
        lay, copied = self.layout, 0
        for b, n in enumerate(lengths):
            tokens = self.xp.arange(self.length[b], n)
            tokens = tokens[(tokens < lay.sink) | (tokens >= lay.first_unpaged(self.n_pages[b]))]
            self.length[b] = n
            if not len(tokens):
                continue
            src, dst = lay.master_slot(tokens), lay.view_slot(tokens)
            self.all_keys[:, b][:, :, dst] = master_keys[:, b][:, :, src]
            self.all_values[:, b][:, :, dst] = master_values[:, b][:, :, src]
            copied += len(tokens)
        return copied

    def write_token(self, b: int, token: int, keys: Tensor, values: Tensor) -> None:
        """Write sequence ``b``'s newest token (``[L, Hkv, D]``) into its sink or ring slot, live."""
        slot = self.layout.view_slot(token)
        self.all_keys[:, b, :, slot] = keys
        self.all_values[:, b, :, slot] = values
        self.mask[b, slot] = 1
        if self.length[b] == token:
            self.length[b] = token + 1

    def update_mask(self, lengths: list[int], non_blocking: bool = False) -> None:
        """Mark live: the sink, the page slots in use, the ring tokens after the pool snapshot, staging."""
        lay, host = self.layout, np
        mask = host.zeros(self.mask.shape, dtype=bool)  # built on the host, copied once
        mask[:, lay.slots:] = True  # the staging slot holds this step's own K/V
        for b, n in enumerate(lengths):
            n_pages = self.n_pages[b]
            mask[b, :min(lay.sink, n)] = True
            mask[b, lay.sink:lay.sink + min(lay.k_pages, n_pages) * lay.page] = True
            first = lay.first_unpaged(n_pages)
            if n > first:
                mask[b, lay.view_slot(host.arange(first, n))] = True
        self.xp.copy_into(self.mask, mask, non_blocking=non_blocking)
