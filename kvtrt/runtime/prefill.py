"""Chunked prefill of one prompt, one chunk per `step()`, so a scheduler can interleave it with
decode steps of the running batch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..contract import GraphVariant
from .buffers import graph_outputs, per_layer
from .kv.store import KVStore


def plan_chunks(n: int, chunk: int, min_last: int) -> list[tuple[int, int]]:
    """Split [0, n) into chunks of `chunk` tokens whose last one has at least `min_last` tokens
    (when n allows), so the graph's score window sees the last `min_last` prompt queries."""
    bounds = list(range(0, n, chunk)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_last:
        bounds[-2] = max(bounds[-3] + 1, n - min_last)
    return list(zip(bounds[:-1], bounds[1:]))


#: ONNX Runtime's CPU GroupQueryAttention in fp16 (an fp16 KV cache) keeps every head's fp32 scores
#: of a chunk at once, heads x chunk x buffer slots x 4 bytes (its fp32 kernel works in tiles); an
#: fp16 cache's prefill chunks are cut to keep that scratch under this (docs/results/kv_dtype.md)
FP16_ATTENTION_SCRATCH = 48 << 20


def attention_chunk(engine, chunk: int, slots: int) -> int:
    """The prefill chunk to use over a buffer of `slots` slots: `chunk`, or on the CPU with an fp16
    KV cache in the fused attention the largest multiple of 64 whose attention scratch fits
    FP16_ATTENTION_SCRATCH (at least 64, and at least the score window, so a prompt's last chunk
    still holds the window's rows)."""
    m = engine.manifest
    if m.kv_dtype != "fp16" or engine.device != "cpu" or m.export_options.get("attention") != "gqa":
        return chunk
    fits = FP16_ATTENTION_SCRATCH // (m.n_heads * max(slots, 1) * 4)
    return min(chunk, max(64, m.score_window, fits // 64 * 64))


class PrefillJob:
    """Runs `ids` through the prefill graph in chunks into a single-sequence `KVStore`.

    With a `prefill_shared` graph the store is allocated once and every chunk writes its K/V into it
    in place; otherwise the store grows by each chunk's `key`/`value` outputs. When done: `store`
    (with the last chunk's attention mass per slot when `track_scores`), `logits` [1,V] of the last
    prompt token and `query`, the last prompt query of every layer [1,H,D].
    """

    def __init__(self, engine, ids: list[int], chunk: int, track_scores: bool, start: int = 0,
                 store: KVStore | None = None, on_chunk: Callable[[list, int], object] | None = None):
        """`start`/`store`: continue after a cached prefix of `start` tokens held in `store`.
        `on_chunk(keys, length)`: called after each chunk with the store's keys per layer and the
        tokens written so far (FreeKV summarizes the completed pages there)."""
        m = engine.manifest
        self.engine, self.ids = engine, ids
        self.shared = GraphVariant.PREFILL_SHARED in m.graphs
        self.variant = GraphVariant.PREFILL_SHARED if self.shared else GraphVariant.PREFILL
        if store is None:
            store = KVStore(m.n_layers, 1, m.n_kv_heads, m.head_dim, engine.dtype, engine.arrays,
                            track_scores=track_scores, score_rows=m.score_rows)
        self.store = store
        self.on_chunk = on_chunk
        if self.shared:
            store.reserve(len(ids) - start)
        chunk = attention_chunk(engine, chunk, store.capacity if self.shared else len(ids))
        self.chunks = [(a + start, b + start) for a, b in plan_chunks(len(ids) - start, chunk, m.score_window)]
        self.tokens = engine.arrays.asarray(ids, np.int64)
        self.next = 0
        self.logits = None  # [1,V]
        self.query: list | None = None  # [1,H,D] per layer

    @property
    def done(self) -> bool:
        return self.next == len(self.chunks)

    @property
    def remaining_tokens(self) -> int:
        return sum(b - a for a, b in self.chunks[self.next:])

    def step(self) -> int:
        """Run the next chunk; returns its token count."""
        m, a, store = self.engine.manifest, self.engine.arrays, self.store
        start, end = self.chunks[self.next]
        s = end - start
        last = self.next == len(self.chunks) - 1  # its last queries are the observation window
        # score rows: the window on the last chunk when a policy tracks scores; one row elsewhere (its
        # score is not used; the window's attention rows would only grow ONNX Runtime's arena)
        window = last and store.scores is not None
        rows = a.arange(max(0, s - m.score_window) if window else s - 1, s)
        inputs = {"input_ids": self.tokens[None, start:end], "position_ids": a.arange(start, end)[None],
                  "past_mask": store.mask, "score_queries": rows}
        if self.shared:
            inputs["write_slot"] = a.asarray(store.claim(s), np.int64)
            outputs = graph_outputs(self.engine, 1, s, store.length, cache=(store.keys, store.values))
        else:
            outputs = graph_outputs(self.engine, 1, s, store.capacity + s)
        for layer in range(m.n_layers):
            inputs[f"past_key.{layer}"] = store.keys[layer]
            inputs[f"past_value.{layer}"] = store.values[layer]
        binding = self.engine.new_binding(self.variant)
        self.engine.bind(binding, inputs, outputs)
        self.engine.run(self.variant, binding, release_arena=last)  # the prompt's activations go before decoding
        del inputs, binding  # let reserve() free each old layer as it copies it (peak: store + 1 layer)
        if self.shared:
            if last:
                store.add_scores(per_layer(outputs, "score"))
        else:
            store.reserve(s)
            store.append(per_layer(outputs, "key"), per_layer(outputs, "value"),
                         per_layer(outputs, "score") if last else None)
        self.next += 1
        if self.on_chunk is not None:
            self.on_chunk(store.keys, store.length)
        if last:
            self.logits, self.query = outputs["logits"][:, 0], per_layer(outputs, "query")
        return s

    def run(self, progress=None) -> tuple[KVStore, object, list]:
        """All remaining chunks; returns (store, logits [1,V], query per layer [1,H,D])."""
        while not self.done:
            n = self.step()
            if progress is not None:
                progress.update(n)
        return self.store, self.logits, self.query
