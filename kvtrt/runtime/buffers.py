"""Output buffers of one graph call, allocated by the caller and bound by pointer."""

from __future__ import annotations

import numpy as np


def graph_outputs(engine, batch: int, new: int, scored: int | None,
                  cache: tuple[list, list] | None = None, arrays=None) -> dict:
    """Buffers for `logits` [B,1,V], the new tokens' `key.{l}`/`value.{l}` [B,Hkv,new,D] (or, for the
    in-place graphs, `present_key.{l}`/`present_value.{l}` bound to the `cache` buffers), `query.{l}`
    [B,H,D] and `score.{l}` [B,R,scored], R = `manifest.score_rows` (none when `scored` is None).
    Arrays of `arrays` (default `engine.arrays`: numpy on the CPU)."""
    m, a, dt = engine.manifest, arrays or engine.arrays, engine.dtype
    out = {"logits": a.empty((batch, 1, m.vocab_size), np.float32)}
    for layer in range(m.n_layers):
        if cache is None:
            out[f"key.{layer}"] = a.empty((batch, m.n_kv_heads, new, m.head_dim), dt)
            out[f"value.{layer}"] = a.empty((batch, m.n_kv_heads, new, m.head_dim), dt)
        else:
            out[f"present_key.{layer}"], out[f"present_value.{layer}"] = cache[0][layer], cache[1][layer]
    for layer in range(m.n_layers):
        out[f"query.{layer}"] = a.empty((batch, m.n_heads, m.head_dim), dt)
    if scored is not None:
        for layer in range(m.n_layers):
            out[f"score.{layer}"] = a.empty((batch, m.score_rows, scored), np.float32)
    return out


def per_layer(outputs: dict, kind: str) -> list:
    """`outputs["{kind}.{l}"]` for every layer, in order."""
    return [outputs[f"{kind}.{layer}"] for layer in range(sum(1 for k in outputs if k.startswith(kind + ".")))]


def bind_decode(engine, variant: str, ids, positions, mask, keys: list, values: list, outputs: dict,
                write_slot=None):
    """A binding of one decode call: `decode` (past K/V in, new K/V out) or `decode_shared`
    (`keys`/`values` are both past and present; the graph writes the step at `write_slot`)."""
    inputs = {"input_ids": ids, "position_ids": positions, "past_mask": mask}
    if write_slot is not None:
        inputs["write_slot"] = write_slot
    for layer, (k, v) in enumerate(zip(keys, values)):
        inputs[f"past_key.{layer}"], inputs[f"past_value.{layer}"] = k, v
    binding = engine.new_binding(variant)
    engine.bind(binding, inputs, outputs)
    return binding
