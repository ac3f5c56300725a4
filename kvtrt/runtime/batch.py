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
reallocated with room for the steps to come. Buffers are allocated for `max_rows` rows with
`torch.empty`: rows never touched are never resident.

`RetrievalGroup` decodes FreeKV/Quest sequences, each with its own views (one call per sequence).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..contract import GraphVariant, group_graphs
from .buffers import bind_decode, graph_outputs, per_layer
from .kv.store import KVStore
from .memory import return_freed_memory

COMPACTION_SLACK = 64  # tokens a compacted row may grow past its budget before it is compacted again
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
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.scores: list[Tensor] | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self._binding = None
        self.slot_bytes = m.kv_bytes_per_token + (4 * m.score_rows * m.n_layers if scored else 0)
        self.room = COMPACTION_SLACK if scored else GROW_STEPS  # most steps a reallocation makes room for

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
            rest = min(rest, row.seq.keep + COMPACTION_SLACK - row.length)
        return max(1, rest)

    def bound(self, rows: list[tuple[int, int]]) -> int:
        """Bytes this batch may hold for rows of (slots, steps to come) until they end: full-cache
        rows of (span, steps), whose sum never grows as they decode; compacting rows of (budget +
        slack, steps), a length they never pass (each reallocation sizes the buffers to the largest
        length + `_steps`)."""
        capacity = max(e + (0 if self.scored else r) for e, r in rows)
        return max(self.touched, len(rows)) * capacity * self.slot_bytes

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
                    d[r, :, n:].zero_()
                src[layer] = s.new_empty(0)
                del s
                return_freed_memory()
        self.mask[r].zero_()
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
                    t[r].copy_(t[last])
            self.mask[r].copy_(self.mask[last])
            self.rows[r] = self.rows[last]
        self.mask[last].zero_()
        self.rows.pop()
        self._binding = None
        if not self.rows:
            self._release()

    def _release(self) -> None:
        self.keys, self.values, self.scores = [], [], None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.capacity = self.touched = 0

    def _tensors(self) -> list[list[Tensor]]:
        return [self.keys, self.values] + ([self.scores] if self.scored else [])

    def _store_tensors(self, store: KVStore) -> list[list[Tensor]]:
        return [store.keys, store.values] + ([store.scores] if self.scored else [])

    def _reallocate(self, copied: int | None = None) -> None:
        """New buffers with room for every row's next steps (`_steps`); the first `copied` rows (all)
        copied to them (`join` copies the row it appended itself)."""
        m, dev = self.m, self.engine.device
        capacity = max(r.length + self._steps(r) for r in self.rows)
        old = self._tensors()
        shape = (self.max_rows, m.n_kv_heads, capacity, m.head_dim)
        new_kv = [[torch.empty(*shape, dtype=self.engine.dtype, device=dev) for _ in range(m.n_layers)] for _ in range(2)]
        new = new_kv + ([[torch.empty(self.max_rows, m.score_rows, capacity, device=dev) for _ in range(m.n_layers)]]
                        if self.scored else [])
        mask = torch.zeros(self.max_rows, capacity, dtype=torch.long, device=dev)
        for i, row in enumerate(self.rows[:copied]):
            n = row.length
            for dst, src in zip(new, old):
                for d, s in zip(dst, src):
                    d[i, :, :n] = s[i, :, :n]
                    if not self.in_place:
                        d[i, :, n:].zero_()
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
            if row.seq.policy is not None and row.length >= row.seq.keep + COMPACTION_SLACK:
                self._compact_row(i, row)

    def _compact_row(self, i: int, row: Row) -> None:
        keep, n, m = row.seq.keep, row.length, self.m
        for layer in range(m.n_layers):
            scores = self.scores[layer][i][:, :n].view(m.n_kv_heads, -1, n)  # [Hkv,R/Hkv,N]
            chosen = row.seq.policy.select(scores, keep)  # [Hkv,keep]
            for t in (self.keys[layer], self.values[layer]):
                kept = torch.gather(t[i], 1, chosen.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
                t[i, :, :n].zero_()
                t[i, :, :keep] = kept
            mass = torch.gather(self.scores[layer][i], 1, chosen.repeat_interleave(scores.shape[1], dim=0))
            self.scores[layer][i, :, :n] = 0
            self.scores[layer][i, :, :keep] = mass
        self.mask[i, keep:n] = 0
        row.length = keep
        row.seq.stats.compactions += 1

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[tuple[object, Tensor]]:
        """One graph call over all rows: writes each row's pending token's KV at its slot.
        Returns (sequence, logits [V]) per row."""
        if self.scored:
            self.compact_due()
        if any(r.length >= self.capacity for r in self.rows):
            self._reallocate()
        batch = len(self.rows)
        if self._binding is None:
            self._bind(batch)
        self.ids.copy_(torch.tensor([[r.seq.pending] for r in self.rows]))
        self.positions.copy_(torch.tensor([[r.seq.position] for r in self.rows]))
        slots = self.slot
        slots.copy_(torch.tensor([r.length for r in self.rows]))
        rows = torch.arange(batch, device=slots.device)
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
        for row in self.rows:
            row.length += 1
            row.seq.held = max(row.seq.held, row.length)
        logits = self._outputs["logits"][:, 0]
        return [(row.seq, logits[i]) for i, row in enumerate(self.rows)]

    def _bind(self, batch: int) -> None:
        dev = self.engine.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(batch, dtype=torch.long, device=dev)
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


class RetrievalGroup:
    """FreeKV / Quest sequences: each attends through its own two view buffers (one call each)."""

    def __init__(self, engine):
        self.engine = engine
        self.members: dict[int, _RetrievalRow] = {}

    @property
    def rows(self) -> list:
        return list(self.members.values())

    @property
    def nbytes(self) -> int:
        return sum(r.manager.nbytes for r in self.members.values())

    def join(self, seq, store: KVStore, query: list[Tensor], manager=None) -> None:
        """`manager`: the one `create_manager` made before the prefill (its summaries built), or a new one."""
        self.members[id(seq)] = _RetrievalRow(self.engine, seq, store, query, manager)

    @staticmethod
    def create_manager(engine, seq, max_context: int):
        """The retrieval manager of one sequence whose cache holds `max_context` tokens."""
        m = engine.manifest
        return seq.retrieval.create(m.n_layers, m.n_kv_heads, m.n_heads, m.head_dim, 1, engine.dtype,
                                    device=engine.device, mask_dtype=torch.long, max_context=max_context,
                                    staging_slot=GraphVariant.DECODE_SHARED in m.graphs)

    def leave(self, seq) -> None:
        row = self.members.pop(id(seq))
        row.close()

    def step(self) -> list[tuple[object, Tensor]]:
        return [(row.seq, row.step()) for row in list(self.members.values())]


class _RetrievalRow:
    """One sequence's retrieval manager, its per-view bindings and step buffers."""

    def __init__(self, engine, seq, store: KVStore, query: list[Tensor], manager=None):
        m, dev = engine.manifest, engine.device
        self.engine, self.seq = engine, seq
        self.shared = GraphVariant.DECODE_SHARED in m.graphs  # each view gets a staging slot the graph writes to
        self.variant = GraphVariant.DECODE_SHARED if self.shared else GraphVariant.DECODE
        t0 = time.perf_counter()
        r = manager if manager is not None else RetrievalGroup.create_manager(engine, seq, store.length)
        # the spec's `select` (default: fresh when the export has decode groups, `kvtrt export --decode-groups`)
        self.grouped = self.shared and seq.retrieval.fresh(m)
        if self.grouped:
            r.use_fresh_queries()
        r.start(store.keys, store.values, query, mask=store.mask, reserve_tokens=seq.remaining + 1, release=True)
        seq.stats.prefill_s += time.perf_counter() - t0  # building the pool is part of the prompt's cost
        self.manager = r
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.slot = torch.full((1,), r.slots, dtype=torch.long, device=dev)
        if self.grouped:
            self.bound = self._bind_groups(r)
            return
        plain = None if self.shared else graph_outputs(engine, 1, 1, r.slots + 1)  # one set for both views
        self.bound = []
        for v in r.views:
            if self.shared:
                outputs = graph_outputs(engine, 1, 1, None, cache=(v.keys, v.values))
                binding = bind_decode(engine, self.variant, self.ids, self.positions, v.mask, v.keys, v.values,
                                      outputs, write_slot=self.slot)
                new_k, new_v = v.all_keys[:, :, :, r.slots:], v.all_values[:, :, :, r.slots:]  # staging slot
            else:
                outputs = plain
                binding = bind_decode(engine, self.variant, self.ids, self.positions, v.mask, v.keys, v.values,
                                      outputs)
                new_k, new_v = per_layer(outputs, "key"), per_layer(outputs, "value")
            self.bound.append((binding, outputs, per_layer(outputs, "query"), new_k, new_v))

    def _bind_groups(self, r) -> list:
        """For the one view a fresh-query manager serves: the lookahead call, then one call per decode
        group (hidden states, queries and lookahead queries in buffers held here), and where the
        step's new K/V land (the view's staging slot)."""
        e, m, dev, dt = self.engine, self.engine.manifest, self.engine.device, self.engine.dtype
        graphs = group_graphs(m.decode_groups)  # the lookahead graph, then the groups
        self.query = torch.empty(m.n_layers, 1, m.n_heads, m.head_dim, dtype=dt, device=dev)      # [L,1,H,D]
        self.lookahead = torch.empty(m.n_layers, 1, m.n_heads, m.head_dim, dtype=dt, device=dev)  # [L,1,H,D]
        self.logits = torch.empty(1, 1, m.vocab_size, device=dev)
        # between groups; held here: a binding keeps only the address
        self.hidden = hidden = [torch.empty(1, 1, m.hidden_size, dtype=dt, device=dev) for _ in graphs[2:]]
        v = r.views[0]  # one view serves every step (`use_fresh_queries`)
        calls = []
        for g, (key, layers, following) in enumerate(graphs, start=-1):  # g = -1: the lookahead graph
            inputs = {"input_ids" if g <= 0 else "hidden": self.ids if g <= 0 else hidden[g - 1],
                      "position_ids": self.positions}
            outputs = {f"lookahead.{layer}": self.lookahead[layer] for layer in following}
            if layers:
                inputs.update({"past_mask": v.mask, "write_slot": self.slot})
                outputs.update({"hidden_out": hidden[g]} if following else {"logits": self.logits})
                for layer in layers:
                    inputs[f"past_key.{layer}"] = outputs[f"present_key.{layer}"] = v.keys[layer]
                    inputs[f"past_value.{layer}"] = outputs[f"present_value.{layer}"] = v.values[layer]
                    outputs[f"query.{layer}"] = self.query[layer]
            binding = e.new_binding(key)
            e.bind(binding, inputs, outputs)
            calls.append((key, binding, layers or None))
        staging = v.all_keys[:, :, :, r.slots:], v.all_values[:, :, :, r.slots:]
        return [(calls, {"logits": self.logits}, self.query, *staging)]

    def step(self) -> Tensor:
        r = self.manager
        self.ids.fill_(self.seq.pending)
        self.positions.fill_(self.seq.position)
        if self.grouped:  # each layer range's pages chosen with its lookahead query, right before it attends
            calls, _, query, new_k, new_v = self.bound[0]
            for key, binding, layers in calls:
                if layers is not None:
                    r.refresh(layers, self.lookahead[layers.start:layers.stop])
                self.engine.run(key, binding)
            r.finish_step(query, new_k, new_v)
            return self.logits[0, 0]
        binding, outputs, new_q, new_k, new_v = self.bound[r.view().index]
        if r.mode == "quest":  # select with the current query: probe, re-select, run again
            self.engine.run(self.variant, binding)
            r.select(new_q)
        else:
            r.prefetch()
        self.engine.run(self.variant, binding)
        r.finish_step(new_q, new_k, new_v)
        return outputs["logits"][0, 0]

    def close(self) -> None:
        self.seq.stats.kv_bytes = max(self.seq.stats.kv_bytes, self.manager.nbytes)
        self.seq.stats.kv = {"retrieval_engaged": 1,
                             "decode_groups": len(self.engine.manifest.group_ranges) if self.grouped else 0,
                             **{k: v for k, v in self.manager.stats().as_dict().items() if isinstance(v, (int, float))}}
        self.manager.close()
