"""Dense per-layer KV storage that the engine binds directly.

Each layer keeps keys and values as `[B, Hkv, capacity, D]`; slot order is position order (the
oldest first), a `[B, capacity]` int64 mask marks live slots. Keys are stored rotated, so slots
can be gathered per head (compaction) without touching positions. The whole capacity is bound
to the graph; dead slots are masked. Growth reallocates once per `reserve` (amortised), never
per step.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVStore:
    """KV cache of a batch of sequences; all sequences share the write cursor `length`."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 0):
        self.shape = (batch, n_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [self._empty(capacity) for _ in range(n_layers)]
        self.values = [self._empty(capacity) for _ in range(n_layers)]
        self.mask = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.length = 0

    def _empty(self, capacity: int) -> Tensor:
        b, h, d = self.shape
        return torch.zeros(b, h, capacity, d, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by stored K and V (allocated capacity, all layers)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def live_tokens(self) -> Tensor:
        """[B] number of live slots per sequence."""
        return self.mask.sum(dim=1)

    def resize(self, capacity: int) -> None:
        """Reallocate to exactly `capacity` slots (>= length), keeping the live prefix."""
        if capacity < self.length:
            raise ValueError(f"cannot shrink below {self.length} stored slots")
        if capacity == self.capacity:
            return
        n = self.length
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = self._empty(capacity)
                new[:, :, :n] = old[:, :, :n]
                tensors[i] = new
        mask = torch.zeros(self.batch, capacity, dtype=torch.long, device=self.device)
        mask[:, :n] = self.mask[:, :n]
        self.mask = mask

    def reserve(self, extra: int) -> bool:
        """Make room for `extra` more slots; True when tensors were reallocated (rebind them)."""
        if self.length + extra <= self.capacity:
            return False
        self.resize(self.length + extra)
        return True

    def append(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Write new tokens' KV (`[B,Hkv,S,D]` per layer) at the cursor; room must be reserved."""
        s = keys[0].shape[2]
        start, end = self.length, self.length + s
        if end > self.capacity:
            raise RuntimeError("KVStore.append without reserve")
        for store, new in zip(self.keys, keys):
            store[:, :, start:end] = new
        for store, new in zip(self.values, values):
            store[:, :, start:end] = new
        self.mask[:, start:end] = 1
        self.length = end

    @classmethod
    def merge(cls, stores: list["KVStore"], extra: int) -> "KVStore":
        """Batch single-sequence stores, right-aligned so all end at one cursor, with `extra` free slots."""
        first = stores[0]
        n = max(s.length for s in stores)
        merged = cls(len(first.keys), len(stores), first.shape[1], first.shape[2], first.dtype, first.device, n + extra)
        for b, s in enumerate(stores):
            offset = n - s.length
            for dst, src in zip(merged.keys + merged.values, s.keys + s.values):
                dst[b, :, offset:n] = src[0, :, :s.length]
            merged.mask[b, offset:n] = s.mask[0, :s.length]
        merged.length = n
        return merged

    def gather(self, keep: list[Tensor], extra: int) -> None:
        """Keep, per layer and KV head, the slots `keep[l]` (`[B,Hkv,k]`, ascending), compacting
        storage to `k + extra` slots. Memory of the dropped slots is released."""
        k = keep[0].shape[-1]
        b, h, d = self.shape
        for tensors in (self.keys, self.values):
            for layer, old in enumerate(tensors):
                new = self._empty(k + extra)
                index = keep[layer].unsqueeze(-1).expand(b, h, k, d)
                new[:, :, :k] = torch.gather(old, 2, index)
                tensors[layer] = new
        mask = torch.zeros(b, k + extra, dtype=torch.long, device=self.device)
        mask[:, :k] = torch.gather(self.mask, 1, keep[0][:, 0])
        self.mask = mask
        self.length = k
