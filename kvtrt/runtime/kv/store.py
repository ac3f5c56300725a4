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

import numpy as np

from ..arrays import NumpyArrays


class KVStore:
    """KV cache of a batch of sequences; all sequences share the write cursor `length`.

    Arrays come from `arrays` (numpy on the CPU, torch on a GPU: see `runtime/arrays.py`); `dtype` is
    a numpy dtype."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, dtype=np.float32,
                 arrays=None, capacity: int = 0, track_scores: bool = False, score_rows: int | None = None):
        self.shape = (batch, n_kv_heads, head_dim)
        self.dtype, self.arrays = np.dtype(dtype), arrays or NumpyArrays()
        self.keys = [self._empty(capacity) for _ in range(n_layers)]
        self.values = [self._empty(capacity) for _ in range(n_layers)]
        rows = score_rows or n_kv_heads
        self.scores = [self.arrays.zeros((batch, rows, capacity)) for _ in range(n_layers)] \
            if track_scores else None
        self.mask = self.arrays.zeros((batch, capacity), np.int64)
        self.length = 0

    def _empty(self, capacity: int):
        b, h, d = self.shape
        return self.arrays.zeros((b, h, capacity, d), self.dtype)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by stored K and V (allocated capacity, all layers)."""
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def grouped_scores(self, layer: int, row: int = 0):
        """Sequence `row`'s tracked mass in `layer` as a policy takes it: `[Hkv, R/Hkv, capacity]`."""
        scores = self.scores[layer][row]
        return scores.reshape(self.shape[1], -1, scores.shape[-1])

    def _tensors(self) -> list[list]:
        return [self.keys, self.values] + ([self.scores] if self.scores is not None else [])

    def clone(self) -> "KVStore":
        """An independent copy (evaluation reuses one prefill for several KV specs)."""
        copy = KVStore(len(self.keys), self.batch, self.shape[1], self.shape[2], self.dtype, self.arrays)
        copy.keys = [self.arrays.copy(t) for t in self.keys]
        copy.values = [self.arrays.copy(t) for t in self.values]
        copy.scores = [self.arrays.copy(t) for t in self.scores] if self.scores is not None else None
        copy.mask, copy.length = self.arrays.copy(self.mask), self.length
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
                new = self.arrays.zeros((*old.shape[:2], capacity, *old.shape[3:]), old.dtype)
                new[:, :, :n] = old[:, :, :n]  # dead slots stay 0: masked, but still multiplied by 0
                tensors[i] = new
                del old
        mask = self.arrays.zeros((self.batch, capacity), np.int64)
        mask[:, :n] = self.mask[:, :n]
        self.mask = mask

    def reserve(self, extra: int) -> bool:
        """Make room for `extra` more slots; True when tensors were reallocated (rebind them)."""
        if self.length + extra <= self.capacity:
            return False
        self.resize(self.length + extra)
        return True

    def append(self, keys: list, values: list, scores: list | None = None) -> None:
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

    def add_scores(self, scores: list) -> None:
        """Add a call's attention mass over the live prefix (`[B,R,length]` per layer, the
        `prefill_shared` graph's score output) to the tracked mass of those slots."""
        if self.scores is not None:
            for acc, new in zip(self.scores, scores):
                acc[:, :, :new.shape[2]] += new

    def compact(self, slots: list, counts: list[int], extra: int) -> None:
        """Keep, per layer, sequence and KV head, the slots `slots[l][b, h, -counts[b]:]` (ascending;
        entries before them are padding), right-aligned, in `max(counts) + extra` slots. The
        dropped slots' memory is released (new tensors, the old ones are freed)."""
        a = self.arrays
        k = slots[0].shape[-1]
        for tensors in self._tensors():
            for layer, old in enumerate(tensors):
                index = slots[layer]
                if old.ndim == 4:
                    index = index[..., None]  # [B,Hkv,k,1]: the same slot for every channel
                else:  # scores: each KV head's slots for its query heads' rows
                    index = a.repeat(index, old.shape[1] // index.shape[1], 1)
                new = a.zeros((*old.shape[:2], k + extra, *old.shape[3:]), old.dtype)
                new[:, :, :k] = a.take_along(old, index, 2)
                tensors[layer] = new
                del old
        self.mask = a.zeros((self.batch, k + extra), np.int64)
        for b, count in enumerate(counts):
            self.mask[b, k - count:k] = 1
        self.length = k
