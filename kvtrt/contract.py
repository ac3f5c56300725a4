"""The graph contract: what export, runtime and validate agree on.

Graph variants, their input and output names, the files of an export folder and the defaults
every command shares. Imports nothing heavy (no torch, no onnx): the runtime reads it to bind a
graph, the exporter to trace one. The README's "The graph contract" describes the tensors.

inputs   input_ids [B,S] int64, position_ids [B,S] int64, past_mask [B,P] int64 (1 = live slot),
         prefill only: score_queries [n] int64 (rows of the chunk whose attention forms `score`),
         in place only: write_slot int64 scalar (first slot the new K/V go to),
         past_key.{l} / past_value.{l} [B,Hkv,P,D] (keys already rotated)
outputs  logits [B,1,V] (last new token), then
         contract graphs: key.{l} / value.{l} [B,Hkv,S,D] (new tokens only), query.{l} [B,H,D],
         score.{l} [B,H,P+S] (per query head; [B,Hkv,P+S], averaged per KV group, in exports
         whose manifest says score_heads "kv": those made before score_heads existed);
         in-place graphs: present_key.{l} / present_value.{l} [B,Hkv,C,D] (the past buffers, the
         new slots written), query.{l}, and for prefill_shared score.{l} [B,H,write_slot+S]
"""

from __future__ import annotations

from enum import StrEnum


class GraphVariant(StrEnum):
    """One graph of an export. A `str`, so it is also its own manifest key and file stem."""

    PREFILL = "prefill"                # S new tokens after P past slots; the full contract
    DECODE = "decode"                  # S = 1; the full contract
    PREFILL_SHARED = "prefill_shared"  # writes the chunk's K/V into the bound store in place
    DECODE_SHARED = "decode_shared"    # writes the step's K/V into the bound store in place

    @property
    def is_prefill(self) -> bool:
        return self in (GraphVariant.PREFILL, GraphVariant.PREFILL_SHARED)

    @property
    def is_decode(self) -> bool:
        return not self.is_prefill

    @property
    def in_place(self) -> bool:
        """Past and present are one buffer: inputs gain `write_slot`, outputs are `present_*`."""
        return self in (GraphVariant.PREFILL_SHARED, GraphVariant.DECODE_SHARED)

    @property
    def has_score(self) -> bool:
        """Whether the graph returns `score.{l}` (decode_shared does not)."""
        return self is not GraphVariant.DECODE_SHARED

    @property
    def onnx_file(self) -> str:
        return f"{self.value}.onnx"


#: the graphs every export has, and the ones a fused-attention (`gqa`) export adds
CONTRACT_VARIANTS = (GraphVariant.PREFILL, GraphVariant.DECODE)
IN_PLACE_VARIANTS = (GraphVariant.PREFILL_SHARED, GraphVariant.DECODE_SHARED)

#: attention of an export (`export_options["attention"]`): standard ONNX ops, or ORT's fused ops
ATTENTION = ("ops", "gqa")
#: what `score.{l}` is per (`Manifest.score_heads`): each query head, or the mean of each KV group's
#: query heads (the only mode before it was recorded); the first is the default
SCORE_HEADS = ("query", "kv")
#: weight quantization of an export (`quantize`, `export_options["quantize"]`); the first is the default
QUANTIZE_METHODS = ("int4",)
QUANTIZE_SCHEMES = ("offset", "rtn")

# -- export folder ---------------------------------------------------------------------------------
WEIGHTS_FILE = "weights.bin"  # every graph's large initializers, written once
ENGINE_DIR = "trt"            # TensorRT engines inside the export (`kvtrt build-engine`)
ENGINE_INDEX = "engines.json"  # their profiles and TensorRT version

# -- defaults shared by export, runtime and the command line -----------------------------------------
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill graph call
DEFAULT_SCORE_WINDOW = 32    # last prompt queries whose attention forms score.{l} (SnapKV's window)


def past_names(n_layers: int, prefix: str = "past") -> list[str]:
    """`{prefix}_key.0, {prefix}_value.0, {prefix}_key.1, ...`: the cache, layer by layer."""
    return [f"{prefix}_{kind}.{layer}" for layer in range(n_layers) for kind in ("key", "value")]


def input_names(n_layers: int, variant: str = GraphVariant.PREFILL) -> list[str]:
    """Graph input names of `variant` (a GraphVariant or its string)."""
    variant = GraphVariant(variant)
    names = ["input_ids", "position_ids", "past_mask"]
    if variant.is_prefill:
        names.append("score_queries")
    if variant.in_place:
        names.append("write_slot")
    return names + past_names(n_layers)


def output_names(n_layers: int, variant: str = GraphVariant.PREFILL) -> list[str]:
    """Graph output names of `variant`: prefill and decode share them; the in-place variants have
    `present_*` instead of `key`/`value`, and only prefill_shared of them a `score`."""
    variant = GraphVariant(variant)
    cache = past_names(n_layers, "present") if variant.in_place else \
        [f"{kind}.{layer}" for layer in range(n_layers) for kind in ("key", "value")]
    names = ["logits", *cache, *(f"query.{layer}" for layer in range(n_layers))]
    if variant.has_score:
        names += [f"score.{layer}" for layer in range(n_layers)]
    return names


__all__ = ["GraphVariant", "CONTRACT_VARIANTS", "IN_PLACE_VARIANTS", "ATTENTION", "QUANTIZE_METHODS",
           "QUANTIZE_SCHEMES", "WEIGHTS_FILE", "ENGINE_DIR", "ENGINE_INDEX", "DEFAULT_PREFILL_CHUNK",
           "DEFAULT_SCORE_WINDOW", "past_names", "input_names", "output_names"]
