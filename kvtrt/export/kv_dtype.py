"""KV cache precision of an export: graphs whose K/V inputs and outputs are fp16 while the model
computes in fp32 (`kvtrt export --kv-dtype fp16`), so the runtime's cache takes half the bytes.

A pass over the graph structure only (weights untouched), applied to each graph of an export:
- past_key.{l} / past_value.{l} inputs and key/value/present_* outputs become float16, and so
  do query.{l} / lookahead.{l} (retrieval compares them with the keys);
- each fused `com.microsoft::GroupQueryAttention` whose past is such an input runs in fp16: its
  query, new K/V and attention bias are cast to fp16 on the way in and its output back to fp32
  (the op converts each head's keys to fp32 inside its kernel, so scores and softmax stay fp32;
  the in-place graphs' shared buffers stay one fp16 tensor);
- every other consumer of an fp16 tensor (standard-op attention of the contract decode graph, the
  `score` rows over the present keys) reads an fp32 copy (`Cast`), and every K/V output made in
  fp32 is cast to fp16 at the end.
What it costs in speed and accuracy on SmolLM2: `docs/results/kv_dtype.md`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..contract import KV_DTYPES
from ..manifest import Manifest

FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT
KV_INPUTS = ("past_key.", "past_value.")
#: outputs in the KV dtype: K/V, and the queries retrieval scores pages with (the runtime binds
#: queries in the KV dtype, as in an fp16 export)
KV_OUTPUTS = ("present_key.", "present_value.", "key.", "value.", "query.", "lookahead.")
#: GroupQueryAttention inputs of its float type T besides the past K/V: query, key, value, attention_bias
GQA_FLOAT_INPUTS = (0, 1, 2, 10)


def set_kv_dtype(directory: str | os.PathLike, kv_dtype: str) -> Manifest:
    """Rewrite the graphs of the export folder `directory` in place for `kv_dtype` ("fp16" on an fp32
    export; "fp32" is a no-op on one already fp32) and record it in the manifest; returns the manifest."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is unknown; use one of {', '.join(KV_DTYPES)}")
    if kv_dtype == manifest.kv_dtype:
        return manifest
    if manifest.kv_dtype != "fp32" or kv_dtype != "fp16":
        raise ValueError(f"{directory} stores its KV as {manifest.kv_dtype}; only an fp32 KV cache can be made "
                         f"{kv_dtype} (re-export with `--kv-dtype {kv_dtype}`)")
    for filename in manifest.graphs.values():
        path = directory / filename
        proto = onnx.load(str(path), load_external_data=False)  # structure only: weights.bin stays as it is
        fp16_kv(proto)
        tmp = path.with_suffix(".kv_dtype.tmp")
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    manifest.kv_dtype = kv_dtype
    manifest.export_options = {**manifest.export_options, "kv_dtype": kv_dtype}
    manifest.save(directory)
    return manifest


def fp16_kv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Make the K/V inputs and outputs of one fp32 graph float16, in place (see the module docstring)."""
    g = proto.graph
    kv_in = {i.name for i in g.input if i.name.startswith(KV_INPUTS)}
    for value in g.input:
        if value.name in kv_in and value.type.tensor_type.elem_type != FP32:
            raise ValueError(f"{value.name} is not fp32; the graph's KV is already converted")
    half = set(kv_in)     # tensors that are fp16 from here on
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}/{'fp16' if to == FP16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"kv_dtype/{casts[key]}"))
        return casts[key]

    for node in g.node:
        fused = (node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"
                 and len(node.input) > 4 and node.input[3] in half)
        if fused:
            for i in GQA_FLOAT_INPUTS:
                if i < len(node.input) and node.input[i] and node.input[i] not in half:
                    node.input[i] = cast(node.input[i], FP16)
            out = node.output[0]
            node.output[0] = f"{out}/fp16"
            nodes.append(node)
            nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=FP32, name=f"kv_dtype/{out}"))
            half.update(name for name in node.output[1:3] if name)
            continue
        for i, name in enumerate(node.input):
            if name in half:
                node.input[i] = cast(name, FP32)
        nodes.append(node)

    producers = {out: node for node in nodes for out in node.output}
    for value in g.output:
        if not value.name.startswith(KV_OUTPUTS):
            if value.name in half:
                raise ValueError(f"output {value.name} would be fp16 but is not K/V or a query")
            continue
        if value.name not in half:  # made in fp32: cast at the end
            made = f"{value.name}/fp32"
            producer = producers[value.name]
            producer.output[list(producer.output).index(value.name)] = made
            for node in nodes:
                node.input[:] = [made if name == value.name else name for name in node.input]
            nodes.append(helper.make_node("Cast", [made], [value.name], to=FP16, name=f"kv_dtype/{value.name}"))
        value.type.tensor_type.elem_type = FP16
    for value in g.input:
        if value.name in kv_in:
            value.type.tensor_type.elem_type = FP16
    # shapes and types recorded for renamed or retyped tensors would now be wrong
    kept = [v for v in g.value_info if v.name not in half]
    del g.value_info[:]
    g.value_info.extend(kept)
    del g.node[:]
    g.node.extend(nodes)
    return proto


__all__ = ["set_kv_dtype", "fp16_kv"]
