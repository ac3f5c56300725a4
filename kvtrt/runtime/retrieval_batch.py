"""FreeKV / Quest sequences at decode: each attends through its own view buffers, one call per step.

The retrieval managers (`kv/freekv.py`) compute in the engine's own arrays: numpy on the CPU (torch
is never imported for them), torch tensors on a GPU. A joining sequence's prompt KV (engine arrays)
is handed over without a copy.
"""

from __future__ import annotations

import time

import numpy as np

from ..contract import GraphVariant, group_graphs
from .buffers import bind_decode, graph_outputs, per_layer
from .engine import DTYPES
from .kv.options import KVSpecError
from .kv.store import KVStore


class RetrievalGroup:
    """FreeKV / Quest sequences: each attends through its own two view buffers (one call each)."""

    def __init__(self, engine):
        self.engine = engine
        self.members: dict[int, _RetrievalRow] = {}
        #: build the pool's page summaries chunk by chunk during the prefill (`begin`/`absorb`), or at the
        #: hand-over (`start`). On the CPU both are the same ~0.02 s of work (7680 tokens) in the same
        #: thread, and during the prefill they hold 11 MiB more where FreeKV's peak RSS is, at the
        #: prefill's end (docs/results/freekv_numpy.md); on a GPU they live on the device: kept there
        self.summarize_in_prefill = engine.device != "cpu"

    @property
    def rows(self) -> list:
        return list(self.members.values())

    @property
    def nbytes(self) -> int:
        return sum(r.manager.nbytes for r in self.members.values())

    @property
    def arrays(self):
        """The engine's arrays (numpy on the CPU, torch tensors on a GPU), which the managers use too."""
        return self.engine.arrays

    def join(self, seq, store: KVStore, query: list, manager=None) -> None:
        """`manager`: the one `create_manager` made before the prefill (its summaries built), or a new one.
        `store`'s arrays (and `query`, [1,H,D] per layer) are handed over to the manager."""
        self.members[id(seq)] = _RetrievalRow(self, seq, store, query, manager)

    def create_manager(self, seq, max_context: int):
        """The retrieval manager of one sequence whose cache holds `max_context` tokens."""
        m = self.engine.manifest
        return seq.retrieval.create(m.n_layers, m.n_kv_heads, m.n_heads, m.head_dim, 1, self.engine.dtype,
                                    device=self.engine.device, mask_dtype=np.int64, max_context=max_context,
                                    staging_slot=GraphVariant.DECODE_SHARED in m.graphs)

    def absorber(self, manager):
        """`PrefillJob`'s `on_chunk` for `manager`: the chunk's keys (engine arrays) summarized into pages."""
        return manager.absorb

    def leave(self, seq) -> None:
        row = self.members.pop(id(seq))
        row.close()

    def step(self) -> list[tuple[object, object]]:
        return [(row.seq, row.step()) for row in list(self.members.values())]


class _RetrievalRow:
    """One sequence's retrieval manager, its per-view bindings and step buffers."""

    def __init__(self, group: RetrievalGroup, seq, store: KVStore, query: list, manager=None):
        engine, a = group.engine, group.arrays
        m = engine.manifest
        self.engine, self.arrays, self.seq = engine, a, seq
        self.shared = GraphVariant.DECODE_SHARED in m.graphs  # each view gets a staging slot the graph writes to
        self.variant = GraphVariant.DECODE_SHARED if self.shared else GraphVariant.DECODE
        t0 = time.perf_counter()
        r = manager if manager is not None else group.create_manager(seq, store.length)
        # the spec's `select` (`RetrievalConfig.path`: inline where kvtrt's decode attention op runs, else fresh
        # with decode groups, else previous on a CPU engine)
        inline = self.shared and getattr(engine, "refreshes_inline", False)
        path = seq.retrieval.path(m, cpu=engine.device == "cpu", inline=inline)
        self.grouped = self.shared and path == "fresh"
        self.lagged = path == "previous"  # one view, re-selected after each step
        self.inline = path == "inline"  # one view, each layer re-selected inside the decode attention op
        if self.grouped or self.lagged or self.inline:
            r.use_fresh_queries()
        if self.inline and not r.inline_ready():  # an int8 pool (refused at submit when asked for by name)
            if seq.retrieval.select == "inline":
                raise KVSpecError(f"{seq.retrieval.mode} select=inline cannot recall this pool's pages in C; "
                                  f"use select=previous")
            self.inline, self.lagged = False, True
        if seq.retrieval.cover and not self.inline:  # (check_kv_spec refuses it at submit)
            raise KVSpecError(f"{seq.retrieval.mode} cover= needs select=inline; this row takes select={path}")
        keys, values = list(store.keys), list(store.values)
        store.keys, store.values = [], []  # the manager holds them now (and frees them: `release`)
        r.start(keys, values, list(query), mask=store.mask, reserve_tokens=seq.remaining + 1, release=True)
        del keys, values
        seq.stats.prefill_s += time.perf_counter() - t0  # building the pool is part of the prompt's cost
        self.manager = r
        self.ids = a.zeros((1, 1), np.int64)
        self.positions = a.zeros((1, 1), np.int64)
        self.slot = a.asarray([r.slots], np.int64)
        if self.grouped:
            self.bound = self._bind_groups(r)
            return
        # every layer's query in one [L,1,H,D] block (finish_step takes it without stacking 30 arrays a step)
        query = a.empty((m.n_layers, 1, m.n_heads, m.head_dim), engine.dtype)
        queries = {f"query.{layer}": query[layer] for layer in range(m.n_layers)}
        plain = None if self.shared else {**graph_outputs(engine, 1, 1, r.slots + 1, arrays=a), **queries}  # both views
        self.bound = []
        for v in r.views:
            if self.shared:
                outputs = {**graph_outputs(engine, 1, 1, None, cache=(v.keys, v.values), arrays=a), **queries}
                binding = bind_decode(engine, self.variant, self.ids, self.positions, v.mask, v.keys, v.values,
                                      outputs, write_slot=self.slot)
                new_k, new_v = v.all_keys[:, :, :, r.slots:], v.all_values[:, :, :, r.slots:]  # staging slot
            else:
                outputs = plain
                binding = bind_decode(engine, self.variant, self.ids, self.positions, v.mask, v.keys, v.values,
                                      outputs)
                new_k, new_v = per_layer(outputs, "key"), per_layer(outputs, "value")
            self.bound.append((binding, outputs, query, new_k, new_v))

    def _bind_groups(self, r) -> list:
        """For the one view a fresh-query manager serves: the lookahead call, then one call per decode
        group (hidden states, queries and lookahead queries in buffers held here), and where the
        step's new K/V land (the view's staging slot)."""
        e, m, a, dt = self.engine, self.engine.manifest, self.arrays, self.engine.dtype
        graphs = group_graphs(m.decode_groups)  # the lookahead graph, then the groups
        self.query = a.empty((m.n_layers, 1, m.n_heads, m.head_dim), dt)      # [L,1,H,D]
        self.lookahead = a.empty((m.n_layers, 1, m.n_heads, m.head_dim), dt)  # [L,1,H,D]
        self.logits = a.empty((1, 1, m.vocab_size))
        # between groups; held here: a binding keeps only the address
        self.hidden = hidden = [a.empty((1, 1, m.hidden_size), DTYPES[m.dtype]) for _ in graphs[2:]]  # activations
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

    def step(self):
        """One decode step; the logits `[V]` (an engine array)."""
        r = self.manager
        self.ids[...] = self.seq.pending
        self.positions[...] = self.seq.position
        if self.grouped:  # each layer range's pages chosen with its lookahead query, right before it attends
            calls, _, query, new_k, new_v = self.bound[0]
            for key, binding, layers in calls:
                if layers is not None:
                    r.refresh(layers, self.lookahead[layers.start:layers.stop])
                self.engine.run(key, binding)
            r.finish_step(query, new_k, new_v)
            return self.logits[0, 0]
        binding, outputs, new_q, new_k, new_v = self.bound[r.view().index]
        if self.inline:  # the decode attention op re-selects each layer's drifted heads with its own query
            with r.inline_refresh():
                self.engine.run(self.variant, binding)
            r.finish_step(new_q, new_k, new_v)
            return outputs["logits"][0, 0]
        if self.lagged:  # the step's queries choose the next step's pages, once it has run
            every = range(self.engine.manifest.n_layers)
            self.engine.run(self.variant, binding)
            rerun = self.seq.retrieval.rerun
            if rerun and r.moved(new_q, rerun):  # it attended pages chosen for another query: again, on its own
                r.refresh(every, new_q)
                self.engine.run(self.variant, binding)
                r.count_rerun()
            r.finish_step(new_q, new_k, new_v)
            r.refresh(every, new_q)
            return outputs["logits"][0, 0]
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
