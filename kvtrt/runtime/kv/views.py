"""The fixed view buffers a retrieval decode binds: sink, selected pages and recent ring per KV head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_torch import torch

from .layout import ViewLayout
from .pages import PagePool

if TYPE_CHECKING:
    from torch import Tensor


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
                 dtype: torch.dtype, device: torch.device, mask_dtype: torch.dtype):
        self.index = index
        self.layout = layout
        width = layout.slots + layout.staging
        # not zeroed here: `clear()` fills it once `start` has moved (and released) the prompt's KV, so
        # its pages are first touched after the dense store is gone (no peak of both)
        self.all_kv = torch.empty((2, n_layers, batch, n_kv_heads, width, head_dim), dtype=dtype, device=device)
        self.all_keys, self.all_values = self.all_kv.unbind(0)
        self.keys = list(self.all_keys.unbind(0))
        self.values = list(self.all_values.unbind(0))
        self.mask = torch.zeros((batch, width), dtype=mask_dtype, device=device)
        self.slot_pages = torch.full((n_layers, batch, n_kv_heads, layout.k_pages), -1, dtype=torch.long,
                                     device=device)
        self.n_pages = [0] * batch
        self.length = [0] * batch

    def clear(self) -> None:
        """Zero the K/V (slots that hold no token must be finite: masked, they are still multiplied by 0)."""
        self.all_kv.zero_()

    def reset(self) -> None:
        self.slot_pages.fill_(-1)
        self.mask.zero_()
        self.n_pages = [0] * len(self.n_pages)
        self.length = [0] * len(self.length)

    @property
    def nbytes(self) -> int:
        return self.all_kv.numel() * self.all_kv.element_size()

    def page_region(self) -> tuple[Tensor, Tensor]:
        """Keys and values of the page slots, each ``[L, B, Hkv, k_pages, page, D]``."""
        lay = self.layout
        shape = (*self.all_keys.shape[:3], lay.k_pages, lay.page, self.all_keys.shape[-1])
        return (self.all_keys[:, :, :, lay.sink:lay.ring_start].view(shape),
                self.all_values[:, :, :, lay.sink:lay.ring_start].view(shape))

    def put_pages(self, pool: PagePool, layers: Tensor, seqs: Tensor, heads: Tensor, slots: Tensor,
                  pages: Tensor) -> None:
        """Copy pool pages ``pages`` into page slots ``slots`` of (layer, sequence, KV head) on the host:
        one gather of whole pages (K and V) from the pool (dequantized from an fp16/int8 pool), one
        ``index_put_`` into the page slots seen as ``[L*B*Hkv, k_pages, 2, page*D]`` blocks (block
        copies beat row-wise ``index_copy_``)."""
        lay, kv = self.layout, self.all_kv
        n_layers, batch, n_kv_heads, width, head_dim = self.all_keys.shape
        block = lay.page * head_dim
        blocks = kv.view(-1).as_strided((n_layers * batch * n_kv_heads, lay.k_pages, 2, block),
                                        (width * head_dim, block, kv.stride(0), 1),
                                        kv.storage_offset() + lay.sink * head_dim)
        owners = (layers * batch + seqs) * n_kv_heads + heads
        # in bounded runs: a whole view's recall (the first one) would otherwise stage every page twice
        # (in the pool's dtype, then in the view's) beside the view, at the sequence's peak of KV memory
        for i in range(0, len(pages), RECALL_RUN):
            run = slice(i, i + RECALL_RUN)
            blocks.index_put_((owners[run], slots[run]), pool.read(layers[run], seqs[run], heads[run], pages[run]))

    def copy_unpaged(self, master_keys: Tensor, master_values: Tensor, lengths: list[int]) -> int:
        """Copy from the master copy the sink/recent tokens this view lacks (tokens inside its pool
        snapshot are skipped); returns how many tokens were copied per (layer, KV head)."""
        lay, copied = self.layout, 0
        for b, n in enumerate(lengths):
            tokens = torch.arange(self.length[b], n)
            tokens = tokens[(tokens < lay.sink) | (tokens >= lay.first_unpaged(self.n_pages[b]))]
            self.length[b] = n
            if not tokens.numel():
                continue
            src = lay.master_slot(tokens).to(self.all_kv.device)
            dst = lay.view_slot(tokens).to(self.all_kv.device)
            self.all_keys[:, b][:, :, dst] = master_keys[:, b][:, :, src]
            self.all_values[:, b][:, :, dst] = master_values[:, b][:, :, src]
            copied += int(tokens.numel())
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
        lay = self.layout
        mask = torch.zeros(self.mask.shape, dtype=torch.bool)
        mask[:, lay.slots:] = True  # the staging slot holds this step's own K/V
        for b, n in enumerate(lengths):
            n_pages = self.n_pages[b]
            mask[b, :min(lay.sink, n)] = True
            mask[b, lay.sink:lay.sink + min(lay.k_pages, n_pages) * lay.page] = True
            first = lay.first_unpaged(n_pages)
            if n > first:
                mask[b, lay.view_slot(torch.arange(first, n))] = True
        self.mask.copy_(mask.to(self.mask.dtype), non_blocking=non_blocking)
