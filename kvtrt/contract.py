"""The graph contract: what export, runtime and validate agree on.

Graph variants, their input and output names, the files of an export folder and the defaults
every command shares. Imports nothing heavy (no torch, no onnx): the runtime reads it to bind a
graph, the exporter to trace one. The README's "The graph contract" describes the tensors.

inputs   input_ids [B,S] int64, position_ids [B,S] int64, past_mask [B,P] int64 (1 = live slot),
         prefill only: score_queries [n] int64 (rows of the chunk whose attention forms `score`),
         in place only: write_slot (prefill_shared: int64 scalar, the chunk's first slot in every
         row; decode_shared and decode groups: int64 [B], row b's token goes to slot write_slot[b]
         and the row attends slots [0, write_slot[b]] only),
         past_key.{l} / past_value.{l} [B,Hkv,P,D] (keys already rotated; like every K/V, query and
         lookahead tensor below, in the manifest's `kv_dtype`: the model's dtype, or fp16 on an fp32
         model exported with --kv-dtype fp16)
outputs  logits [B,1,V] (last new token), then
         contract graphs: key.{l} / value.{l} [B,Hkv,S,D] (new tokens only), query.{l} [B,H,D],
         score.{l} [B,H,P+S] (per query head; [B,Hkv,P+S], averaged per KV group, in exports
         whose manifest says score_heads "kv": those made before score_heads existed);
         in-place graphs: present_key.{l} / present_value.{l} [B,Hkv,C,D] (the past buffers, the
         new slots written), query.{l}, and for prefill_shared score.{l} [B,H,write_slot+S]

decode_heads (every export): decode over one pool of slots per layer shared by the KV heads, so heads
may keep different numbers of tokens without padding (AdaKV, `adakv:`). Inputs input_ids, position_ids,
past_owner [B,L,P] int64 (the KV head whose token a slot holds, per layer; -1 = dead), past_key.{l} /
past_value.{l} [B,1,P,D]; outputs logits, key.{l} / value.{l} [B,Hkv,1,D] (the new token, which the
runtime files into one slot per KV head), query.{l}, and score.{l} [B,H|Hkv,P+1] (each query head's
attention over the pool slots, its own KV head's only, then over its new token).

decode groups (optional, `kvtrt export --decode-groups N`): decode_shared cut into N layer ranges
[a, b), one graph each (`decode_group.{g}`), so retrieval can choose a range's pages with the step's
own query before the range attends. Group g takes input_ids [B,1] (g = 0) or hidden [B,1,E] (the
residual stream entering layer a), position_ids, past_mask, write_slot and its layers' past_*;
it returns logits (last group) or hidden_out [B,1,E] (the next group's hidden), its layers' present_*
and query.{l}, and lookahead.{l}
[B,H,D] for the next group's layers: each one's query (rotated, pre-scaled like query.{l})
projected from the hidden state leaving group g (exact for the next group's first layer, the
others' input is approximated by it). `decode_lookahead` (input_ids, position_ids) gives group 0's
lookahead from the token's embedding (exact for layer 0).
"""

from __future__ import annotations

from enum import StrEnum


class GraphVariant(StrEnum):
    """One graph of an export. A `str`, so it is also its own manifest key and file stem."""

    PREFILL = "prefill"                # S new tokens after P past slots; the full contract
    DECODE = "decode"                  # S = 1; the full contract
    PREFILL_SHARED = "prefill_shared"  # writes the chunk's K/V into the bound store in place
    DECODE_SHARED = "decode_shared"    # writes the step's K/V into the bound store in place
    DECODE_HEADS = "decode_heads"      # S = 1 over one slot pool per layer shared by the KV heads

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
CONTRACT_VARIANTS = (GraphVariant.PREFILL, GraphVariant.DECODE, GraphVariant.DECODE_HEADS)
IN_PLACE_VARIANTS = (GraphVariant.PREFILL_SHARED, GraphVariant.DECODE_SHARED)

#: attention of an export (`export_options["attention"]`): standard ONNX ops, or ORT's fused ops
ATTENTION = ("ops", "gqa")
#: what `score.{l}` is per (`Manifest.score_heads`): each query head, or the mean of each KV group's
#: query heads (the only mode before it was recorded); the first is the default
SCORE_HEADS = ("query", "kv")
#: weight quantization of an export (`quantize`, `export_options["quantize"]`); the first is the default
QUANTIZE_METHODS = ("int4",)
#: precision of the KV cache an export's graphs read and write (`Manifest.kv_dtype`); fp16 on an fp32
#: model halves the cache (`kvtrt.export.kv_dtype`); the default is the model's dtype
KV_DTYPES = ("fp32", "fp16")
QUANTIZE_SCHEMES = ("offset", "rtn")

# -- export folder ---------------------------------------------------------------------------------
WEIGHTS_FILE = "weights.bin"  # every graph's large initializers, written once
ENGINE_DIR = "trt"            # TensorRT engines inside the export (`kvtrt build-engine`)
ENGINE_INDEX = "engines.json"  # their profiles and TensorRT version

# -- defaults shared by export, runtime and the command line -----------------------------------------
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill graph call
DEFAULT_SCORE_WINDOW = 32    # last prompt queries whose attention forms score.{l} (SnapKV's window)


DECODE_GROUP = "decode_group"  # manifest key of group g: f"{DECODE_GROUP}.{g}"
LOOKAHEAD = "decode_lookahead"  # the graph that gives group 0's lookahead queries


def group_key(group: int) -> str:
    """The manifest key (and file stem) of decode group `group`."""
    return f"{DECODE_GROUP}.{group}"


def group_bounds(n_layers: int, groups: int) -> list[int]:
    """Layer boundaries [0, ..., n_layers] of `groups` ranges as even as they can be."""
    if not 1 <= groups <= n_layers:
        raise ValueError(f"decode groups must be between 1 and the model's {n_layers} layers, got {groups}")
    return [round(g * n_layers / groups) for g in range(groups + 1)]


def group_graphs(bounds: list[int]) -> list[tuple[str, range, range]]:
    """(manifest key, layers, next layers) of the lookahead graph (no layers) and of every decode group,
    in the order a step runs them, for the layer boundaries `bounds` (`Manifest.decode_groups`)."""
    if not bounds:
        return []
    ranges = [range(a, z) for a, z in zip(bounds[:-1], bounds[1:])]
    following = ranges[1:] + [range(0)]
    return [(LOOKAHEAD, range(0), ranges[0]), *((group_key(g), r, f) for g, (r, f) in enumerate(zip(ranges, following)))]


def group_names(layers: range, next_layers: range, n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decode group over `layers` (empty: the lookahead graph)."""
    if not layers:
        return ["input_ids", "position_ids"], [f"lookahead.{layer}" for layer in next_layers]
    return group_input_names(layers), group_output_names(layers, next_layers, n_layers)


def group_input_names(layers: range) -> list[str]:
    """Inputs of the decode group over `layers`."""
    first = "input_ids" if layers.start == 0 else "hidden"
    return [first, "position_ids", "past_mask", "write_slot",
            *(f"past_{kind}.{layer}" for layer in layers for kind in ("key", "value"))]


def group_output_names(layers: range, next_layers: range, n_layers: int) -> list[str]:
    """Outputs of the decode group over `layers`, followed by the group over `next_layers` (empty: last)."""
    head = "logits" if layers.stop == n_layers else "hidden_out"
    return [head, *(f"present_{kind}.{layer}" for layer in layers for kind in ("key", "value")),
            *(f"query.{layer}" for layer in layers), *(f"lookahead.{layer}" for layer in next_layers)]


def past_names(n_layers: int, prefix: str = "past") -> list[str]:
    """`{prefix}_key.0, {prefix}_value.0, {prefix}_key.1, ...`: the cache, layer by layer."""
    return [f"{prefix}_{kind}.{layer}" for layer in range(n_layers) for kind in ("key", "value")]


def input_names(n_layers: int, variant: str = GraphVariant.PREFILL) -> list[str]:
    """Graph input names of `variant` (a GraphVariant or its string)."""
    variant = GraphVariant(variant)
    names = ["input_ids", "position_ids", "past_owner" if variant is GraphVariant.DECODE_HEADS else "past_mask"]
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


__all__ = ["DECODE_GROUP", "LOOKAHEAD", "group_key", "group_bounds", "group_graphs", "group_names",
           "group_input_names", "group_output_names",
           "GraphVariant", "CONTRACT_VARIANTS", "IN_PLACE_VARIANTS", "ATTENTION", "QUANTIZE_METHODS",
           "QUANTIZE_SCHEMES", "WEIGHTS_FILE", "ENGINE_DIR", "ENGINE_INDEX", "DEFAULT_PREFILL_CHUNK",
           "DEFAULT_SCORE_WINDOW", "past_names", "input_names", "output_names"]
