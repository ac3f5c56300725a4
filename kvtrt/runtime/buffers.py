"""Output buffers of one graph call, allocated by the caller and bound by pointer."""

from __future__ import annotations

import torch
from torch import Tensor


def graph_outputs(engine, batch: int, new: int, scored: int | None,
                  cache: tuple[list[Tensor], list[Tensor]] | None = None) -> dict[str, Tensor]:
    """Buffers for `logits` [B,1,V], the new tokens' `key.{l}`/`value.{l}` [B,Hkv,new,D] (or, for the
    in-place graphs, `present_key.{l}`/`present_value.{l}` bound to the `cache` buffers), `query.{l}`
    [B,H,D] and `score.{l}` [B,R,scored], R = `manifest.score_rows` (none when `scored` is None)."""
    m, dev, dt = engine.manifest, engine.device, engine.dtype
    out = {"logits": torch.empty(batch, 1, m.vocab_size, device=dev)}
    for layer in range(m.n_layers):
        if cache is None:
            out[f"key.{layer}"] = torch.empty(batch, m.n_kv_heads, new, m.head_dim, dtype=dt, device=dev)
            out[f"value.{layer}"] = torch.empty(batch, m.n_kv_heads, new, m.head_dim, dtype=dt, device=dev)
        else:
            out[f"present_key.{layer}"], out[f"present_value.{layer}"] = cache[0][layer], cache[1][layer]
    for layer in range(m.n_layers):
        out[f"query.{layer}"] = torch.empty(batch, m.n_heads, m.head_dim, dtype=dt, device=dev)
    if scored is not None:
        for layer in range(m.n_layers):
            out[f"score.{layer}"] = torch.empty(batch, m.score_rows, scored, device=dev)
    return out


def per_layer(outputs: dict[str, Tensor], kind: str) -> list[Tensor]:
    """`outputs["{kind}.{l}"]` for every layer, in order."""
    return [outputs[f"{kind}.{layer}"] for layer in range(sum(1 for k in outputs if k.startswith(kind + ".")))]


def bind_decode(engine, variant: str, ids: Tensor, positions: Tensor, mask: Tensor, keys: list[Tensor],
                values: list[Tensor], outputs: dict[str, Tensor], write_slot: Tensor | None = None):
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
