"""Dense per-layer KV storage that the engine binds directly.

Each layer keeps keys and values as `[B, Hkv, capacity, D]`; slot order is position order (the
oldest first), a `[B, capacity]` int64 mask marks live slots. Keys are stored rotated, so slots
can be gathered per head (compaction) without touching positions. The whole capacity is bound
to the graph; dead slots are masked. Growth reallocates once per `reserve` (amortised), never
per step. With `track_scores`, every slot also carries the attention mass it has received
(`scores[l]`, `[B, R, capacity]` float32, R = `score_rows`: the export's query heads, grouped by
KV head, or its KV heads), which the compaction policies rank.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVStore:
    """KV cache of a batch of sequences; all sequences share the write cursor `length`."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 0, track_scores: bool = False, score_rows: int | None = None):
        self.shape = (batch, n_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [self._empty(capacity) for _ in range(n_layers)]
        self.values = [self._empty(capacity) for _ in range(n_layers)]
        rows = score_rows or n_kv_heads
        self.scores = [torch.zeros(batch, rows, capacity, device=device) for _ in range(n_layers)] \
            if track_scores else None
        self.mask = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.length = 0

    def _empty(self, capacity: int, dtype: torch.dtype | None = None) -> Tensor:
        b, h, d = self.shape
        return torch.zeros(b, h, capacity, d, dtype=dtype or self.dtype, device=self.device)

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

    def grouped_scores(self, layer: int, row: int = 0) -> Tensor:
        """Sequence `row`'s tracked mass in `layer` as a policy takes it: `[Hkv, R/Hkv, capacity]`."""
        scores = self.scores[layer][row]
        return scores.view(self.shape[1], -1, scores.shape[-1])

    def _tensors(self) -> list[list[Tensor]]:
        return [self.keys, self.values] + ([self.scores] if self.scores is not None else [])

    def clone(self) -> "KVStore":
        """An independent copy (evaluation reuses one prefill for several KV specs)."""
        copy = KVStore(len(self.keys), self.batch, self.shape[1], self.shape[2], self.dtype, self.device)
        copy.keys = [t.clone() for t in self.keys]
        copy.values = [t.clone() for t in self.values]
        copy.scores = [t.clone() for t in self.scores] if self.scores is not None else None
        copy.mask, copy.length = self.mask.clone(), self.length
        return copy

    def resize(self, capacity: int) -> None:
        """Reallocate to exactly `capacity` slots (>= length), keeping the live prefix."""
        if capacity < self.length:
            raise ValueError(f"cannot shrink below {self.length} stored slots")
        if capacity == self.capacity:
            return
        n = self.length
        for tensors in self._tensors():
            for i, old in enumerate(tensors):
                new = old.new_empty(*old.shape[:2], capacity, *old.shape[3:])
                new[:, :, :n] = old[:, :, :n]
                new[:, :, n:] = 0  # dead slots are masked but still multiplied by 0: keep them finite
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

    def append(self, keys: list[Tensor], values: list[Tensor], scores: list[Tensor] | None = None) -> None:
        """Write new tokens' KV (`[B,Hkv,S,D]` per layer) at the cursor; room must be reserved.

        `scores[l]` (`[B,R,capacity+S]`, the graph's score output for this call) is added to the
        tracked mass of the stored slots and becomes the new slots' first mass."""
        s = keys[0].shape[2]
        start, end = self.length, self.length + s
        if end > self.capacity:
            raise RuntimeError("KVStore.append without reserve")
        for store, new in zip(self.keys, keys):
            store[:, :, start:end] = new
        for store, new in zip(self.values, values):
            store[:, :, start:end] = new
        if self.scores is not None and scores is not None:
            for acc, new in zip(self.scores, scores):
                acc[:, :, :start] += new[:, :, :start]
                acc[:, :, start:end] = new[:, :, -s:]
        self.mask[:, start:end] = 1
        self.length = end

    def claim(self, count: int = 1) -> int:
        """Mark `count` slots at the cursor live and return the first, for an engine that writes the
        new tokens' K/V there itself (the `*_shared` graphs); room must be reserved."""
        if self.length + count > self.capacity:
            raise RuntimeError("KVStore.claim without reserve")
        start = self.length
        self.mask[:, start:start + count] = 1
        self.length += count
        return start

    def add_scores(self, scores: list[Tensor]) -> None:
        """Add a call's attention mass over the live prefix (`[B,R,length]` per layer, the
        `prefill_shared` graph's score output) to the tracked mass of those slots."""
        if self.scores is not None:
            for acc, new in zip(self.scores, scores):
                acc[:, :, :new.shape[2]] += new

    @classmethod
    def merge(cls, stores: list["KVStore"], extra: int) -> "KVStore":
        """Batch single-sequence stores, right-aligned so all end at one cursor, with `extra` free slots."""
        first = stores[0]
        n = max(s.length for s in stores)
        merged = cls(len(first.keys), len(stores), first.shape[1], first.shape[2], first.dtype, first.device, n + extra,
                     track_scores=first.scores is not None,
                     score_rows=first.scores[0].shape[1] if first.scores is not None else None)
        for b, s in enumerate(stores):
            offset = n - s.length
            for dst_list, src_list in zip(merged._tensors(), s._tensors()):
                for dst, src in zip(dst_list, src_list):
                    dst[b, :, offset:n] = src[0, :, :s.length]
            merged.mask[b, offset:n] = s.mask[0, :s.length]
        merged.length = n
        return merged

    def compact(self, slots: list[Tensor], counts: list[int], extra: int) -> None:
        """Keep, per layer, sequence and KV head, the slots `slots[l][b, h, -counts[b]:]` (ascending;
        entries before them are padding), right-aligned, in `max(counts) + extra` slots. The
        dropped slots' memory is released (new tensors, the old ones are freed)."""
        k = slots[0].shape[-1]
        for tensors in self._tensors():
            for layer, old in enumerate(tensors):
                index = slots[layer]
                if old.dim() == 4:
                    index = index.unsqueeze(-1).expand(*index.shape, old.shape[-1])
                else:  # scores: each KV head's slots for its query heads' rows
                    index = index.repeat_interleave(old.shape[1] // index.shape[1], dim=1)
                new = old.new_zeros(*old.shape[:2], k + extra, *old.shape[3:])
                new[:, :, :k] = torch.gather(old, 2, index)
                tensors[layer] = new
        self.mask = torch.zeros(self.batch, k + extra, dtype=torch.long, device=self.device)
        for b, count in enumerate(counts):
            self.mask[b, k - count:k] = 1
        self.length = k
