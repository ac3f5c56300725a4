"""Page recall onto a CUDA device: host gather into pinned staging, copy on a side stream.

Written against the documented ``torch.cuda`` API; imported only when a retrieval manager runs on
a CUDA device, so it is never exercised on a machine without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_torch import torch

from .pages import PagePool

if TYPE_CHECKING:
    from torch import Tensor


class CudaPageCopier:
    """The copy stream, its completion event and the pinned staging buffers of one manager."""

    def __init__(self, device: torch.device, page: int, head_dim: int, dtype: torch.dtype):
        self.device, self.page, self.head_dim, self.dtype = device, page, head_dim, dtype
        self.stream = torch.cuda.Stream(device=device)
        self.event = torch.cuda.Event()
        self.host = torch.empty((0, 2, page, head_dim), dtype=dtype)
        self.staged: Tensor | None = None

    def follow_caller(self) -> None:
        """Order the copy stream after the work already queued on the caller's stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def on_stream(self, wait: bool = False):
        """Context that queues work on the copy stream (``wait``: after the caller's queued work)."""
        if wait:
            self.follow_caller()
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        """Block until the copy stream's queued recall is done (an event recorded behind it)."""
        self.event.record(self.stream)
        self.event.synchronize()

    def copy_pages(self, pool: PagePool, page_keys: Tensor, page_values: Tensor, layers: Tensor, seqs: Tensor,
                   heads: Tensor, slots: Tensor, pages: Tensor) -> None:
        """Gather the pages on the host into pinned staging, copy them to the device on the copy
        stream and scatter them into page slots ``page_keys``/``page_values`` ``[L, B, Hkv, k, page, D]``."""
        count = int(pages.numel())
        if pool.int8_scheme is not None:  # PagePool refuses it on CUDA already; say so here too
            raise ValueError("the CUDA page copier moves fp32/fp16 pages only; use pool_dtype=fp16 or fp32")
        rows = pool.page_rows(layers.cpu(), seqs.cpu(), heads.cpu(), pages.cpu())
        if self.host.shape[0] < count or self.host.dtype != pool.data.dtype:
            # staged in the pool's dtype (an fp16 pool moves half the bytes), widened on the device
            self.host = torch.empty((count, 2, self.page, self.head_dim), dtype=pool.data.dtype, pin_memory=True)
            self.staged = torch.empty((count, 2, self.page, self.head_dim), dtype=pool.data.dtype,
                                      device=self.device)
        host, staged = self.host[:count], self.staged[:count]
        torch.index_select(pool.data.view(-1, 2, self.page, self.head_dim), 0, rows, out=host)
        with torch.cuda.stream(self.stream):
            staged.copy_(host, non_blocking=True)
            pages_kv = staged if staged.dtype == self.dtype else staged.to(self.dtype)
            page_keys[layers, seqs, heads, slots] = pages_kv[:, 0]
            page_values[layers, seqs, heads, slots] = pages_kv[:, 1]
        self.stream.synchronize()  # the pinned staging buffer is reused by the next copy
