"""Fused ops, each beside its standard-ONNX fallback (and, later, TensorRT plugins).

- `ort_attention`: GroupQueryAttention / SharedCacheAttention (ORT contrib op) and the
  standard-op prefill and decode attention.
- `ort_norm`: SkipSimplifiedLayerNormalization (ORT contrib op) and RMSNorm in standard ops.
- `attention_inputs`: the fused attention's run-time lengths and masks, as small subgraphs.

A fused op traces as a `kvtrt::` placeholder node; `to_contrib_ops` turns the placeholders of an
exported graph into the `com.microsoft` nodes ONNX Runtime runs.
"""

from __future__ import annotations

from . import ort_attention, ort_norm

PLACEHOLDER_DOMAIN = "kvtrt"
CONTRIB_DOMAIN = "com.microsoft"
#: placeholder op type -> the contrib node's inputs from the placeholder's
CONTRIB_INPUTS = {"GroupQueryAttention": ort_attention.contrib_inputs,
                  "SkipSimplifiedLayerNormalization": ort_norm.contrib_inputs}


def to_contrib_ops(proto):
    """Turn the traced `kvtrt::` placeholders of an onnx.ModelProto into `com.microsoft` nodes, in place."""
    from onnx import helper

    found = False
    for node in proto.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type in CONTRIB_INPUTS:
            inputs = CONTRIB_INPUTS[node.op_type](list(node.input))
            del node.input[:]
            node.input.extend(inputs)
            node.domain = CONTRIB_DOMAIN
            found = True
    kept = [o for o in proto.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    if found and not any(o.domain == CONTRIB_DOMAIN for o in kept):
        kept.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


__all__ = ["PLACEHOLDER_DOMAIN", "CONTRIB_DOMAIN", "CONTRIB_INPUTS", "to_contrib_ops"]
