"""The decode group of sequences whose KV heads keep different numbers of tokens (AdaKV, `adakv:`).

Layout (why): a row of `DenseBatch` is `[Hkv, C, D]` per layer with one mask for all heads, so heads
that keep different numbers of tokens would have to be padded to the largest (1.6-2.0x the budget's
bytes on SmolLM2, `docs/results/adaptive_budgets.md`). Here each layer's cache is one pool of slots
`[rows, 1, Hkv*C, D]` that the KV heads share, and `owner [rows, L, Hkv*C]` says which KV head's token a
slot holds (-1: dead). The `decode_heads` graph lets each query head attend its own KV head's slots;
the runtime files the step's new K/V into Hkv slots per layer, one per KV head. A row holds
`Hkv * length` slots in every layer (compaction keeps `Hkv * keep` per layer, each step adds Hkv), so
the bytes are exactly the budget's and `length` counts tokens per head, as in `DenseBatch` (whose
membership, memory bound and reallocation this class reuses, in units of Hkv slots). Within a head
its slots stay in position order: compaction keeps the order and new tokens go to the end.
"""

from __future__ import annotations

import numpy as np

from ..contract import GraphVariant
from .arrays import host
from .batch import DenseBatch, Row
from .buffers import graph_outputs
from .kv.store import KVStore
from .memory import return_freed_memory


class HeadPoolBatch(DenseBatch):
    """Rows of per-head-budget sequences decoding from one slot pool per layer (see the module doc)."""

    def __init__(self, engine, max_rows: int):
        super().__init__(engine, scored=True, max_rows=max_rows)
        m = self.m
        self.in_place, self.variant = False, GraphVariant.DECODE_HEADS
        self.heads = m.n_kv_heads
        self.owner = self.arrays.zeros((0, m.n_layers, 0), np.int64)  # [max_rows, L, Hkv*capacity]
        # per token of every head: its K and V, the owner of its slot (8 B) and its scores, all layers
        self.slot_bytes = m.kv_bytes_per_token + self.heads * m.n_layers * (8 + 4 * m.score_rows)

    # -- membership ------------------------------------------------------------------------
    def join(self, seq, store: KVStore) -> None:
        """Move a single-sequence store (the prompt, every head with all its tokens) into a new row,
        keeping what `seq.policy.allocate` chooses per KV head when it holds more than its budget."""
        m, a = self.m, self.arrays
        if len(self.rows) >= self.max_rows:
            raise RuntimeError("HeadPoolBatch.join past max_rows")
        live = a.nonzero(store.mask[0])
        n = min(seq.keep, len(live))
        r = len(self.rows)
        self.rows.append(Row(seq, n))
        if n >= self.capacity:
            self._reallocate(copied=r)
        for layer in range(m.n_layers):
            scores = store.grouped_scores(layer)[..., live]  # [Hkv, R/Hkv, N]
            if len(live) > n:
                kept = seq.policy.allocate([host(s) for s in scores], n)
                seq_slots = [live[a.asarray(k)] for k in kept]
            else:
                seq_slots = [live] * self.heads
            heads = np.repeat(np.arange(self.heads), [len(s) for s in seq_slots])
            tokens = a.asarray(np.concatenate([host(s) for s in seq_slots]))
            heads_a = a.asarray(heads)
            count = len(heads)  # == Hkv * n
            self.keys[layer][r, 0, :count] = store.keys[layer][0][heads_a, tokens]
            self.values[layer][r, 0, :count] = store.values[layer][0][heads_a, tokens]
            self.keys[layer][r, 0, count:] = 0  # the graph reads every slot: dead ones must be finite
            self.values[layer][r, 0, count:] = 0
            grouped = store.grouped_scores(layer)  # [Hkv, R/Hkv, C]: each KV head's score rows
            per_head = grouped.shape[1]
            self.scores[layer][r] = 0
            for h in range(self.heads):
                mine = a.asarray(np.flatnonzero(heads == h))
                self.scores[layer][r][h * per_head:(h + 1) * per_head, mine] = grouped[h][:, tokens[mine]]
            self.owner[r, layer] = -1
            self.owner[r, layer, :count] = heads_a
            store.keys[layer] = a.empty((0,), store.keys[layer].dtype)  # the store's buffers go as they are copied
            store.values[layer] = a.empty((0,), store.values[layer].dtype)
            return_freed_memory()
        if len(live) > n:
            seq.stats.compactions += 1
        self.touched = max(self.touched, len(self.rows))
        self._binding = None

    def _row_marks(self) -> list[tuple[object, int]]:
        return [(self.owner, -1)]  # (the pool has no past_mask: the owners mark live slots)

    def _release(self) -> None:
        super()._release()
        self.owner = self.arrays.zeros((0, self.m.n_layers, 0), np.int64)

    def _reallocate(self, copied: int | None = None) -> None:
        """New pools with room for every row's next steps; the first `copied` rows copied to them."""
        m, a = self.m, self.arrays
        capacity = max(r.length + self._steps(r) for r in self.rows)
        slots = self.heads * capacity
        keys = [a.zeros((self.max_rows, 1, slots, m.head_dim), self.engine.dtype) for _ in range(m.n_layers)]
        values = [a.zeros((self.max_rows, 1, slots, m.head_dim), self.engine.dtype) for _ in range(m.n_layers)]
        scores = [a.zeros((self.max_rows, m.score_rows, slots)) for _ in range(m.n_layers)]
        owner = a.zeros((self.max_rows, m.n_layers, slots), np.int64)
        owner[...] = -1
        for i, row in enumerate(self.rows[:copied]):
            used = self.heads * row.length
            for dst, src in ((keys, self.keys), (values, self.values), (scores, self.scores)):
                for d, s in zip(dst, src):
                    d[i, :, :used] = s[i, :, :used]
            owner[i, :, :used] = self.owner[i, :, :used]
        self.keys, self.values, self.scores, self.owner = keys, values, scores, owner
        self.capacity = capacity
        self.touched = len(self.rows)
        self.reallocations += 1
        self._binding = None

    # -- compaction ------------------------------------------------------------------------
    def _compact_row(self, i: int, row: Row) -> None:
        """Back to `Hkv * keep` slots per layer, chosen by `policy.allocate` from each head's own slots."""
        keep, used, m, a = row.seq.keep, self.heads * row.length, self.m, self.arrays
        for layer in range(m.n_layers):
            owner = host(self.owner[i, layer, :used])
            grouped = host(self.scores[layer][i, :, :used]).reshape(self.heads, -1, used)  # [Hkv, R/Hkv, used]
            mine = [np.flatnonzero(owner == h) for h in range(self.heads)]
            kept = row.seq.policy.allocate([grouped[h][:, s] for h, s in enumerate(mine)], keep)
            slots = a.asarray(np.sort(np.concatenate([s[k] for s, k in zip(mine, kept)])))
            count = len(slots)  # == Hkv * keep
            for t in (self.keys[layer], self.values[layer], self.scores[layer]):
                kept_t = t[i][:, slots]
                t[i, :, :used] = 0
                t[i, :, :count] = kept_t
            self.owner[i, layer, :count] = self.owner[i, layer][slots]  # (a copy: fancy indexing)
            self.owner[i, layer, count:] = -1
        row.length = keep
        row.seq.stats.compactions += 1

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[tuple[object, object]]:
        """One `decode_heads` call over all rows; each row's new K/V go to its next Hkv slots (one per
        KV head), their scores beside them. Returns (sequence, logits [V]) per row."""
        batch = self._begin_step()
        a, m, g = self.arrays, self.m, self.m.score_rows // self.heads
        self.engine.run(self.variant, self._binding)
        out = self._outputs
        first = np.asarray([self.heads * r.length for r in self.rows])  # [B] each row's first new slot
        rows = a.asarray(np.repeat(np.arange(batch), self.heads))        # [B*Hkv]
        heads = np.tile(np.arange(self.heads), batch)
        slots = a.asarray(np.repeat(first, self.heads) + heads)          # [B*Hkv] head h's new slot
        heads = a.asarray(heads)
        score_rows = np.arange(m.score_rows)
        new_rows = a.asarray(np.repeat(np.arange(batch), m.score_rows))           # [B*R]
        new_slots = a.asarray((first[:, None] + score_rows // g).reshape(-1))    # [B*R] score row r: its head's slot
        score_rows = a.asarray(np.tile(score_rows, batch))
        for layer in range(m.n_layers):
            self.keys[layer][rows, 0, slots] = out[f"key.{layer}"][rows, heads, 0]
            self.values[layer][rows, 0, slots] = out[f"value.{layer}"][rows, heads, 0]
            self.owner[rows, layer, slots] = heads
            score = out[f"score.{layer}"]  # [B,R,P+1]: pool slots, then each row's own new token
            self.scores[layer][:batch] += score[:, :, :-1]  # other heads' and dead slots get no mass
            self.scores[layer][new_rows, score_rows, new_slots] = score[:, :, -1].reshape(-1)
        return self._end_step()

    def _bind(self, batch: int) -> None:
        a = self.arrays
        self.ids = a.zeros((batch, 1), np.int64)
        self.positions = a.zeros((batch, 1), np.int64)
        self._outputs = graph_outputs(self.engine, batch, 1, self.heads * self.capacity + 1)
        inputs = {"input_ids": self.ids, "position_ids": self.positions, "past_owner": self.owner[:batch]}
        for layer in range(self.m.n_layers):
            inputs[f"past_key.{layer}"] = self.keys[layer][:batch]
            inputs[f"past_value.{layer}"] = self.values[layer][:batch]
        self._binding = self.engine.new_binding(self.variant)
        self.engine.bind(self._binding, inputs, self._outputs)
