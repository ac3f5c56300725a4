"""Decode groups: the sequences that share one graph call per step.

Layout (why): the exported decode graphs take one `[B, Hkv, C, D]` buffer per layer and one
`past_mask [B, C]`; the in-place graph (`decode_shared`) also takes a `write_slot [B]`, one per row.
So each row holds its sequence's KV left-aligned in `[0, length)`, the next token goes to slot
`length` of that row, and in the in-place graph a row attends its own `[0, length]` only (ONNX Runtime's
GroupQueryAttention reads each row up to its own length): rows of any length decode together
without paying for each other's padding. The `decode` graph (compaction, which needs `score`, and
exports without in-place graphs) reads all C slots, the dead ones masked and zeroed (masked slots
are still multiplied by 0); the runtime writes its new K/V at each row's slot. A joining sequence is
copied into the next free row; a leaving one is replaced by the last row (one row copy) so the
active rows stay `[:R]` and are bound as views. When a row reaches the capacity the batch is
reallocated with room for the steps to come. Buffers are allocated for `max_rows` rows as
`arrays.empty` (memory maps on the CPU): rows never touched are never resident.

FreeKV/Quest sequences decode in `retrieval_batch.RetrievalGroup`, each with its own views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import GraphVariant
from .arrays import host
from .buffers import bind_decode, graph_outputs
from .kv.policies import COMPACTION_SLACK
from .kv.store import KVStore
from .memory import return_freed_memory

GROW_STEPS = 256  # most room a reallocation adds to a full-cache row (it ends sooner or grows again)


@dataclass
class Row:
    seq: object  # the scheduler's Sequence: .pending (next input token), .position, .keep, .policy, .remaining
    length: int  # live slots [0, length); the next token's K/V go to slot `length`


class DenseBatch:
    """Rows decoding from dense KV buffers: `decode_shared` (in place) for the full cache, or
    `decode` with per-slot attention scores when rows compact (any policy, each row its own)."""

    def __init__(self, engine, scored: bool, max_rows: int):
        m = engine.manifest
        self.engine, self.m, self.scored, self.max_rows = engine, m, scored, max_rows
        self.in_place = not scored and GraphVariant.DECODE_SHARED in m.graphs
        self.variant = GraphVariant.DECODE_SHARED if self.in_place else GraphVariant.DECODE
        self.rows: list[Row] = []
        self.capacity = 0
        self.touched = 0  # rows written since the last allocation (resident memory)
        self.reallocations = 0  # buffer reallocations so far
        self.keys: list = []  # [max_rows,Hkv,capacity,D] per layer
        self.values: list = []
        self.scores: list | None = None  # [max_rows,R,capacity] per layer
        self.mask = self.arrays.zeros((0, 0), np.int64)  # [max_rows,capacity]
        self._binding = None
        self.slot_bytes = m.kv_bytes_per_token + (4 * m.score_rows * m.n_layers if scored else 0)
        self.room = COMPACTION_SLACK if scored else GROW_STEPS  # most steps a reallocation makes room for

    @property
    def arrays(self):
        """The engine's array type (numpy on the CPU)."""
        return self.engine.arrays

    # -- memory ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes resident in this batch's buffers (rows touched since the last reallocation)."""
        return self.touched * self.capacity * self.slot_bytes

    def _steps(self, row: Row) -> int:
        """Steps a reallocation makes room for: the row's steps to come, up to `room`; a compacting
        row's only until it is compacted again (at budget + slack)."""
        rest = min(row.seq.remaining, self.room)
        if self.scored and row.seq.policy is not None:
            rest = min(rest, row.seq.keep + row.seq.policy.slack - row.length)
        return max(1, rest)

    def bound(self, rows: list[tuple[int, int]], current: bool = True) -> int:
        """Bytes this batch may hold for rows of (slots, steps to come) until they end: full-cache
        rows of (span, steps), whose sum never grows as they decode; compacting rows of (budget +
        slack, steps), a length they never pass (each reallocation sizes the buffers to the largest
        length + `_steps`). A row joining without a reallocation fills the buffers as they are, whose
        length may still be that of a longer row that has left: that length counts too (`current`;
        without it, the bound of these rows alone in a new batch)."""
        capacity = max(self.capacity if current else 0, *(e + (0 if self.scored else r) for e, r in rows))
        return max(self.touched if current else 0, len(rows)) * capacity * self.slot_bytes

    # -- membership ------------------------------------------------------------------------
    def join(self, seq, store: KVStore) -> None:
        """Move a single-sequence store (all slots live, `[0, length)`) into a new row. The store
        is emptied layer by layer as it is copied, so the sequence's KV is held once plus a layer."""
        n = store.length
        if len(self.rows) >= self.max_rows:
            raise RuntimeError("DenseBatch.join past max_rows")
        r = len(self.rows)
        self.rows.append(Row(seq, n))
        if n >= self.capacity:
            self._reallocate(copied=r)
        for dst, src in zip(self._tensors(), self._store_tensors(store)):
            for layer, (d, s) in enumerate(zip(dst, src)):
                d[r, :, :n] = s[0, :, :n]
                if not self.in_place:  # the decode graph reads every slot: dead ones must be finite
                    d[r, :, n:] = 0
                src[layer] = self.arrays.empty((0,), s.dtype)  # the store's buffer goes (no view of it is kept)
                del s
                return_freed_memory()
        self.mask[r] = 0
        self.mask[r, :n] = 1
        self.touched = max(self.touched, len(self.rows))
        self._binding = None

    def leave(self, seq) -> None:
        """Drop `seq`'s row; the last row moves into its place."""
        r = next(i for i, row in enumerate(self.rows) if row.seq is seq)
        last = len(self.rows) - 1
        if r != last:
            for tensors in self._tensors():
                for t in tensors:
                    t[r] = t[last]
            for marks, _ in self._row_marks():
                marks[r] = marks[last]
            self.rows[r] = self.rows[last]
        for marks, dead in self._row_marks():
            marks[last] = dead
        self.rows.pop()
        self._binding = None
        if not self.rows:
            self._release()

    def _row_marks(self) -> list[tuple[object, int]]:
        """Per-row arrays beside the K/V (moved with a row) and the value that marks a slot dead."""
        return [(self.mask, 0)]

    def _release(self) -> None:
        self.keys, self.values, self.scores = [], [], None
        self.mask = self.arrays.zeros((0, 0), np.int64)
        self.capacity = self.touched = 0

    def _tensors(self) -> list[list]:
        return [self.keys, self.values] + ([self.scores] if self.scored else [])

    def _store_tensors(self, store: KVStore) -> list[list]:
        return [store.keys, store.values] + ([store.scores] if self.scored else [])

    def _reallocate(self, copied: int | None = None) -> None:
        """New buffers with room for every row's next steps (`_steps`); the first `copied` rows (all)
        copied to them (`join` copies the row it appended itself)."""
        m, a = self.m, self.arrays
        capacity = max(r.length + self._steps(r) for r in self.rows)
        old = self._tensors()
        shape = (self.max_rows, m.n_kv_heads, capacity, m.head_dim)
        new_kv = [[a.empty(shape, self.engine.dtype) for _ in range(m.n_layers)] for _ in range(2)]
        new = new_kv + ([[a.empty((self.max_rows, m.score_rows, capacity)) for _ in range(m.n_layers)]]
                        if self.scored else [])
        mask = a.zeros((self.max_rows, capacity), np.int64)
        for i, row in enumerate(self.rows[:copied]):
            n = row.length
            for dst, src in zip(new, old):
                for d, s in zip(dst, src):
                    d[i, :, :n] = s[i, :, :n]
                    if not self.in_place:
                        d[i, :, n:] = 0
            mask[i, :n] = 1
        self.keys, self.values = new[0], new[1]
        self.scores = new[2] if self.scored else None
        self.mask, self.capacity = mask, capacity
        self.touched = len(self.rows)
        self.reallocations += 1
        self._binding = None

    # -- compaction ------------------------------------------------------------------------
    def compact_due(self) -> None:
        """Compact every row that outgrew its budget by the slack (scored batches)."""
        for i, row in enumerate(self.rows):
            if row.seq.policy is not None and row.length >= row.seq.keep + row.seq.policy.slack:
                self._compact_row(i, row)

    def _compact_row(self, i: int, row: Row) -> None:
        keep, n, m, a = row.seq.keep, row.length, self.m, self.arrays
        for layer in range(m.n_layers):
            scores = self.scores[layer][i][:, :n].reshape(m.n_kv_heads, -1, n)  # [Hkv,R/Hkv,N]
            chosen = a.asarray(row.seq.policy.select(scores, keep))  # [Hkv,keep] (picked in numpy on the host)
            for t in (self.keys[layer], self.values[layer]):
                kept = a.take_along(t[i], chosen[..., None], 1)  # [Hkv,keep,D]
                t[i, :, :n] = 0
                t[i, :, :keep] = kept
            mass = a.take_along(self.scores[layer][i], a.repeat(chosen, scores.shape[1], 0), 1)  # [R,keep]
            self.scores[layer][i, :, :n] = 0
            self.scores[layer][i, :, :keep] = mass
        self.mask[i, keep:n] = 0
        row.length = keep
        row.seq.stats.compactions += 1

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[tuple[object, object]]:
        """One graph call over all rows: writes each row's pending token's KV at its slot.
        Returns (sequence, logits [V], a numpy view valid until the next step) per row."""
        batch, a = self._begin_step(), self.arrays
        slots = self.slot
        slots[:] = a.asarray([r.length for r in self.rows])
        rows = a.arange(batch)
        if self.in_place:  # the graph writes the slot and attends it
            self.mask[rows, slots] = 1
        self.engine.run(self.variant, self._binding)
        if not self.in_place:  # the graph attended past + new apart; the new K/V are filed now
            self.mask[rows, slots] = 1
            out = self._outputs
            for layer in range(self.m.n_layers):
                self.keys[layer][rows, :, slots] = out[f"key.{layer}"][:, :, 0]
                self.values[layer][rows, :, slots] = out[f"value.{layer}"][:, :, 0]
                if self.scored:
                    score = out[f"score.{layer}"]  # [rows,R,C+1]: past slots, then the new token
                    self.scores[layer][:batch] += score[:, :, :-1]  # dead slots get no mass
                    self.scores[layer][rows, :, slots] = score[:, :, -1]
        return self._end_step()

    def _begin_step(self) -> int:
        """Compact the rows that are due, make room, bind, and write the step's ids and positions; the rows."""
        if self.scored:
            self.compact_due()
        if any(r.length >= self.capacity for r in self.rows):
            self._reallocate()
        batch = len(self.rows)
        if self._binding is None:
            self._bind(batch)
        self.ids[:] = self.arrays.asarray([[r.seq.pending] for r in self.rows])
        self.positions[:] = self.arrays.asarray([[r.seq.position] for r in self.rows])
        return batch

    def _end_step(self) -> list[tuple[object, object]]:
        """Every row one token longer; (sequence, logits [V]) per row."""
        for row in self.rows:
            row.length += 1
            row.seq.held = max(row.seq.held, row.length)
        logits = host(self._outputs["logits"][:, 0])  # [B,V] on the host: a view on the CPU, one copy from a GPU
        return [(row.seq, logits[i]) for i, row in enumerate(self.rows)]

    def _bind(self, batch: int) -> None:
        a = self.arrays
        self.ids = a.zeros((batch, 1), np.int64)
        self.positions = a.zeros((batch, 1), np.int64)
        self.slot = a.zeros((batch,), np.int64)
        keys = [k[:batch] for k in self.keys]
        values = [v[:batch] for v in self.values]
        mask = self.mask[:batch]
        if self.in_place:
            self._outputs = graph_outputs(self.engine, batch, 1, None, cache=(keys, values))
            self._binding = bind_decode(self.engine, self.variant, self.ids, self.positions, mask, keys, values,
                                        self._outputs, write_slot=self.slot)
        else:
            self._outputs = graph_outputs(self.engine, batch, 1, self.capacity + 1 if self.scored else None)
            self._binding = bind_decode(self.engine, self.variant, self.ids, self.positions, mask, keys, values,
                                        self._outputs)
