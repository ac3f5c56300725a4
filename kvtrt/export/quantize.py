"""int4 weight-only quantization of an export folder, in place (`quantize_export`).

Every projection (`*_weight_t` MatMul initializers: fused QKV, o, gate/up, down, and the lm_head)
becomes ONNX Runtime's `com.microsoft::MatMulNBits` (4-bit, block 32 along K). Both graphs keep
sharing ONE weights file: quantization is deterministic, so prefill and decode produce identical
quantized initializers under identical names and `onnx_export.save_shared` writes each once
(checking the bytes agree).

Two schemes, measured on SmolLM2-135M (teacher-forced perplexity on the haystack essays, 384
tokens after a 128-token prompt; decode ms/step of the decode graph at P=264, batch 1, 2 threads,
side by side on this shared, loaded machine, so compare rows, not absolute numbers):

| export | ppl | ratio | decode ms/step |
|---|---|---|---|
| fp32 | 19.92 | 1 | 81.6 |
| int4 `offset` (default, accuracy_level 4) | 20.40 | 1.024 | 30.8 |
| int4 `offset`, accuracy_level 1 (fp32 compute) | 20.35 | 1.021 | ~40 |
| int4 `rtn` symmetric (onnxruntime quantizer) | 24.84 | 1.247 | 24.5 |
| int4 `rtn` asymmetric (onnxruntime quantizer) | 26.49 | 1.329 | ~29 |

Why `rtn` fails here: the bundled SmolLM2 is a GGUF **Q4_1** file, so its float weights already
sit on a 4-bit grid `m + d*i` per block of 32 (block along K, the same axis MatMulNBits blocks).
Re-quantizing with an *integer* zero point (asymmetric) shifts every block by up to d/2 - a
coherent per-block bias - and symmetric blocks use a different step; either way a second int4
error lands on top of the first. The onnxruntime quantizer cannot express a fractional zero point
on its fast path (a float `zero_points` input falls back to dequantize-then-GEMM in ORT 1.32:
131 ms instead of 3 ms for the 576x49152 lm_head), so:

**`offset` scheme**: per block, min/max over the 32 weights, step `s = (max-min)/15`,
`q = round((w - min)/s)` in 0..15 - the Q4_1 scheme, exact for Q4_1 weights and a plain
asymmetric min/max RTN for any other model. MatMulNBits runs it *symmetric* (no zero-point
input, so the implicit zero point 8 and the fastest kernels): it computes sum (q-8)*s*x, and the
rest, `(min + 8 s)` per block times the block sums of x, is one small float MatMul
([.., K/32] @ [K/32, N], 1/8 byte per weight) added to it:
`y = MatMulNBits(x) + ReduceSum(reshape(x, [.., K/32, 32]), -1) @ offsets`.
Standard ONNX ops for the correction; onnxruntime's int4 kernels for the bulk.

Other choices:
- **Block 32**: the Q4_1 block; the finest MatMulNBits' int8-compute kernels handle.
- **`accuracy_level=4`** (int8 activations x int4 weights on CPU, MLAS `CompInt8`) by default:
  the fastest CPU path measured here (30.8 vs ~40 ms/step for 1 = fp32 compute, for +0.3% ppl);
  the CUDA kernels ignore it.
- The offsets cost ~5 ms/step over `rtn` (4 small nodes per projection); that buys 20 points of
  perplexity. The layers are exact for Q4_1 weights (accuracy_level 1 gives 20.35, the same as
  quantizing only the lm_head), so what is left is the Q8_0 embedding/lm_head going to int4.
- **lm_head at 8 bits by default** (`lm_head_bits=8`, offset scheme): symmetric 8-bit blocks
  (`quantize_blocks8`, scale = block max|w| / 127) reproduce a GGUF Q8_0 table exactly, so the
  export is the GGUF's own model: perplexity 1.0014x fp32 against 1.0558x with a 4-bit lm_head
  (10 haystack texts, 256 tokens after 4096), and no measurable decode cost (the 8-bit head reads
  28 MB per token; the 4-bit one 14 MB plus 3.5 MB of offsets and their extra nodes).
- **Runtime note:** MatMulNBits needs MLAS prepacking; an ONNX Runtime session created with
  `session.disable_prepacking=1` re-packs the int4 weights on every call (measured 660 ms/step
  instead of 30). Sessions of an int4 export must keep prepacking on.
- **lm_head included, tied embedding shared.** `DecoderGraph` looks tokens up as columns of
  `lm_head.weight_t` ([hidden, V], a Gather on axis 1). MatMulNBits stores that matrix as
  B = [V, K/32, 16] uint8 - one row of packed blocks per token - which is exactly what
  `com.microsoft::GatherBlockQuantized` reads with `gather_axis=0, quantize_axis=2, bits=4` (or
  `[V, K/32, 32]` and `bits=8` for an 8-bit head, zero point 128).
  The lookup becomes GatherBlockQuantized on the *same* initializer (scales reshaped in-graph to
  [V, K/32, 1]) plus the token's block offsets gathered from the same offsets table. An untied
  embedding gets its own int4 table the same way. (`embedding="float"` keeps a float lookup.)

Providers: MatMulNBits runs on CPU and CUDA (fp32/fp16). GatherBlockQuantized has CUDA kernels
for fp16/bf16 only, so an fp32 int4 export on CUDA runs that one small lookup on the CPU EP (ORT
inserts the copies); an fp16 export keeps it on the GPU. TensorRT parses neither contrib op:
build TensorRT engines from a float fp16 export.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..contract import QUANTIZE_METHODS as METHODS
from ..contract import QUANTIZE_SCHEMES as SCHEMES
from ..contract import WEIGHTS_FILE
from ..manifest import Manifest

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
_LOG = logging.getLogger(__name__)


def quantize_export(directory: str | os.PathLike, method: str = "int4", block_size: int = 32, *,
                    scheme: str = "offset", symmetric: bool = False, accuracy_level: int = 4,
                    embedding: str = "shared", lm_head_bits: int | None = None) -> Manifest:
    """Rewrite the export folder `directory` in place with int4 weights; return its new manifest.

    `scheme`: "offset" (default; MatMulNBits + per-block float offsets, see the module docstring)
    or "rtn" (onnxruntime's MatMulNBitsQuantizer as is; `symmetric` picks its variant).
    `embedding`: "shared" looks the tied embedding up in the int4 lm_head (GatherBlockQuantized),
    "float" keeps the lookup in float. `lm_head_bits`: 8 (the default with the offset scheme) keeps
    the lm_head and the tied table at 8 bits, symmetric blocks, exact for a GGUF Q8_0 table; 4
    quantizes it like the projections (the default with rtn, which has no 8-bit path). The manifest
    records `quantize: "int4"` and the options in `export_options["quantize"]`.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    if method not in METHODS:
        raise ValueError(f"quantization method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    if manifest.quantize != "none":
        raise ValueError(f"{directory} is already quantized ({manifest.quantize}); re-export the model to start "
                         f"from float weights")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 (4 = int8 compute on CPU), got {accuracy_level}")
    if embedding not in ("shared", "float"):
        raise ValueError(f"embedding must be 'shared' or 'float', got {embedding!r}")
    if lm_head_bits is None:
        lm_head_bits = 8 if scheme == "offset" else 4
    if lm_head_bits not in (4, 8):
        raise ValueError(f"lm_head_bits must be 4 or 8, got {lm_head_bits}")
    if lm_head_bits == 8 and scheme != "offset":
        raise ValueError("an 8-bit lm_head needs scheme 'offset' (the rtn scheme quantizes everything to 4 bits)")

    from .onnx_export import save_shared

    protos = {}
    notes: dict[str, str] = {}
    for variant, filename in manifest.graphs.items():
        proto = onnx.load(str(directory / filename), load_external_data=True)
        protos[variant] = quantize_model(proto, block_size, scheme=scheme, symmetric=symmetric,
                                         accuracy_level=accuracy_level, embedding=embedding, notes=notes,
                                         lm_head_bits=lm_head_bits)
    # write into a scratch folder first, then move the files over the originals
    with tempfile.TemporaryDirectory(dir=directory, prefix=".quantize-") as tmp:
        save_shared(protos, manifest.graphs, Path(tmp))
        for filename in [*manifest.graphs.values(), WEIGHTS_FILE]:
            os.replace(Path(tmp) / filename, directory / filename)
    if manifest.weights_file != WEIGHTS_FILE:
        (directory / manifest.weights_file).unlink(missing_ok=True)
        manifest.weights_file = WEIGHTS_FILE
    manifest.quantize = method
    manifest.export_options = {**manifest.export_options, "quantize": {
        "method": method, "scheme": scheme, "block_size": block_size,
        "symmetric": symmetric if scheme == "rtn" else None, "accuracy_level": accuracy_level,
        "embedding": notes.get("embedding", embedding), "lm_head_bits": lm_head_bits}}
    manifest.save(directory)
    return manifest


def quantize_model(model: onnx.ModelProto, block_size: int = 32, *, scheme: str = "offset", symmetric: bool = False,
                   accuracy_level: int = 4, embedding: str = "shared", notes: dict | None = None,
                   lm_head_bits: int = 4) -> onnx.ModelProto:
    """One graph: MatMul on `*_weight_t` -> MatMulNBits (+ offsets); embedding -> GatherBlockQuantized."""
    notes = notes if notes is not None else {}
    if any(not n.name for n in model.graph.node if n.op_type == "MatMul"):
        raise ValueError("every MatMul node needs a name to select what to quantize; re-export the model")
    ranks = _ranks(model)
    if scheme == "rtn":
        model = _quantize_rtn(model, block_size, symmetric, accuracy_level)
    else:
        _quantize_offset(model, block_size, accuracy_level, ranks, {"lm_head_weight_t"} if lm_head_bits == 8 else set())
    if not any(n.op_type == "MatMulNBits" for n in model.graph.node):
        raise RuntimeError("no MatMul was quantized: the graph has no `*_weight_t` projection initializers")
    notes["embedding"] = _quantize_embedding(model, block_size, scheme, symmetric, ranks) \
        if embedding == "shared" else "float"
    _topological_sort(model.graph)
    _drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


# -- projections -----------------------------------------------------------------------------------
def _quantizable(name: str, inits: dict) -> bool:
    tensor = inits.get(name)
    return (tensor is not None and name.endswith("_weight_t") and len(tensor.dims) == 2
            and tensor.data_type in FLOAT_TYPES)


def _quantize_rtn(model, block_size: int, symmetric: bool, accuracy_level: int):
    """onnxruntime's MatMulNBitsQuantizer (round to nearest, integer zero points) on the projections."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    inits = {t.name: t for t in model.graph.initializer}
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and not _quantizable(n.input[1], inits)]
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


def quantize_blocks(weight: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max 4-bit blocks of a [K, N] weight along K (K a multiple of `block_size`).

    Returns MatMulNBits' B ([N, K/block, block/2] uint8, low nibble first), its scales
    ([N, K/block], the weight's dtype) and the offsets ([K/block, N], same dtype) such that
    `W[k, n] = (q - 8) * scale + offset` for the block of k: exactly `min + q * (max - min) / 15`.
    """
    K, N = weight.shape
    if K % block_size:
        raise ValueError(f"K={K} is not a multiple of the block size {block_size}")
    kb = K // block_size
    blocks = np.ascontiguousarray(weight.astype(np.float32).T).reshape(N, kb, block_size)
    low = blocks.min(-1)
    scale = (blocks.max(-1) - low) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # constant block: q = 0, w = low
    # store the step in the weight dtype and quantize against the stored value (exact for Q4_1 data)
    scale = scale.astype(weight.dtype).astype(np.float32)
    q = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    offsets = (low + 8.0 * scale).T  # [kb, N]
    return packed, scale.astype(weight.dtype), np.ascontiguousarray(offsets).astype(weight.dtype)


def quantize_blocks8(weight: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blocks of a [K, N] weight along K: MatMulNBits' B ([N, K/block, block] uint8,
    zero point 128) and scales ([N, K/block]) with `W[k, n] = (q - 128) * scale`. The scale is the
    block's max |w| / 127, so a GGUF Q8_0 block (`d * q`, |q| <= 127, the largest at 127) is exact."""
    K, N = weight.shape
    if K % block_size:
        raise ValueError(f"K={K} is not a multiple of the block size {block_size}")
    blocks = np.ascontiguousarray(weight.astype(np.float32).T).reshape(N, K // block_size, block_size)
    scale = np.abs(blocks).max(-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scale.astype(weight.dtype)


def _quantize_offset(model, block_size: int, accuracy_level: int, ranks: dict[str, int],
                     eight_bit: set[str] = frozenset()) -> None:
    """MatMul(x, W) -> MatMulNBits(x, q, s) + ReduceSum(blocks of x) @ offsets (see module docstring);
    the weights named in `eight_bit` become plain symmetric 8-bit MatMulNBits (no offsets)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes = []
    for node in graph.node:
        name = node.input[1] if node.op_type == "MatMul" else None
        if name is None or not _quantizable(name, inits):
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[name])
        K, N = weight.shape
        if K % block_size:
            _LOG.warning("%s: K=%d is not a multiple of %d; left in float", name, K, block_size)
            new_nodes.append(node)
            continue
        kb = K // block_size
        x, y, p = node.input[0], node.output[0], node.name.replace("/", "_").strip("_")
        if name in eight_bit:
            packed, scales = _shared_quantized(graph, inits, name, weight, block_size, bits=8)
            new_nodes.append(helper.make_node("MatMulNBits", [x, packed, scales], [y], name=f"{p}_MatMulNBits",
                                              domain="com.microsoft", K=K, N=N, bits=8, block_size=block_size,
                                              accuracy_level=accuracy_level))
            continue
        packed, scales, offsets = _shared_quantized(graph, inits, name, weight, block_size)
        main, sums = f"{p}_nbits", f"{p}_block_sums"
        new_nodes.append(helper.make_node("MatMulNBits", [x, packed, scales], [main], name=f"{p}_MatMulNBits",
                                          domain="com.microsoft", K=K, N=N, bits=4, block_size=block_size,
                                          accuracy_level=accuracy_level))
        rank = ranks.get(x)
        if rank:
            shape = _const(graph, f"{p}_blocks_shape", [0] * (rank - 1) + [kb, block_size])
        else:  # unknown rank: Shape(x)[:-1] ++ [kb, block]
            head = f"{p}_x_shape"
            new_nodes.append(helper.make_node("Shape", [x], [head], end=-1, name=f"{p}_x_shape"))
            shape = f"{p}_blocks_shape"
            new_nodes.append(helper.make_node("Concat", [head, _const(graph, f"{p}_kb_block", [kb, block_size])],
                                              [shape], axis=0, name=f"{p}_blocks_shape"))
        new_nodes += [
            helper.make_node("Reshape", [x, shape], [f"{p}_blocks"], name=f"{p}_blocks"),
            helper.make_node("ReduceSum", [f"{p}_blocks", _const(graph, f"{p}_last_axis", [-1])], [sums],
                             keepdims=0, name=f"{p}_block_sums"),
            helper.make_node("MatMul", [sums, offsets], [f"{p}_offset"], name=f"{p}_offset"),
            helper.make_node("Add", [main, f"{p}_offset"], [y], name=f"{p}_add_offset")]
    graph.ClearField("node")
    graph.node.extend(new_nodes)


def _shared_quantized(graph, inits: dict, name: str, weight: np.ndarray, block_size: int,
                      bits: int = 4) -> tuple[str, ...]:
    """Quantize `name` once (a second user reuses the same initializers): 4-bit min/max blocks
    (`{name}_Q4`, `_scales`, `_offsets`) or symmetric 8-bit blocks (`{name}_Q8`, `_scales`)."""
    if bits == 8:
        names, arrays = (f"{name}_Q8", f"{name}_scales"), quantize_blocks8
    else:
        names, arrays = (f"{name}_Q4", f"{name}_scales", f"{name}_offsets"), quantize_blocks
    if names[0] not in inits:
        for tensor_name, array in zip(names, arrays(weight, block_size)):
            tensor = numpy_helper.from_array(array, tensor_name)
            graph.initializer.append(tensor)
            inits[tensor_name] = tensor
    return names


def _ranks(model) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - ranks are an optimization only
        return {}
    out = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input):
        if info.type.tensor_type.HasField("shape"):
            out[info.name] = len(info.type.tensor_type.shape.dim)
    return out


# -- embedding -------------------------------------------------------------------------------------
def _quantize_embedding(model: onnx.ModelProto, block_size: int, scheme: str, symmetric: bool,
                        ranks: dict[str, int]) -> str:
    """Replace the token lookup by GatherBlockQuantized; return what was done (for the manifest)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    done = "float"
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if len(table.dims) != 2 or table.data_type not in FLOAT_TYPES:
            continue
        if axis == 1 and (f"{table.name}_Q4" in inits or f"{table.name}_Q8" in inits):
            # tied: columns of lm_head.weight_t [K, V], then Transpose(perm=[1,0]) -> [n, K]
            after = consumers.get(node.output[0], [])
            if len(after) != 1 or after[0].op_type != "Transpose" or \
                    [helper.get_attribute_value(a) for a in after[0].attribute if a.name == "perm"] != [[1, 0]]:
                _LOG.warning("the tied embedding lookup has an unexpected form; keeping a float table")
                continue
            K, V = table.dims
            out_name, remove = after[0].output[0], [node, after[0]]
            bits = 8 if f"{table.name}_Q8" in inits else 4
            done = f"shared with the int{bits} lm_head (GatherBlockQuantized)"
        elif axis == 0:
            # untied: rows of embed.weight [V, K] = columns of its transpose, quantized like a MatMul B
            V, K = table.dims
            if K % block_size:
                continue
            weight = numpy_helper.to_array(table)
            if scheme == "rtn":
                _rtn_table(graph, inits, table.name, weight.T, block_size, symmetric)
            else:
                _shared_quantized(graph, inits, table.name, np.ascontiguousarray(weight.T), block_size)
            out_name, remove, bits = node.output[0], [node], 4
            done = "int4 GatherBlockQuantized (untied table)"
        else:
            continue
        rank = ranks.get(node.input[1])
        if not rank:
            _LOG.warning("the rank of the token ids is unknown; keeping a float embedding table")
            continue
        graph.node.extend(_lookup_nodes(graph, inits, table.name, node, V, K, block_size, out_name, rank, bits))
        for n in remove:
            graph.node.remove(n)
    return done


def _lookup_nodes(graph, inits, table: str, node, V: int, K: int, block: int, out_name: str, rank: int,
                  bits: int = 4) -> list:
    """GatherBlockQuantized over the MatMulNBits layout of `table` (+ offsets or zero points)."""
    kb = -(-K // block)
    p = (node.name.replace("/", "_").strip("_") or table) + "_q4"
    ids = node.input[1]
    nodes = [helper.make_node("Reshape", [f"{table}_scales", _const(graph, f"{p}_scales_shape", [V, kb, 1])],
                              [f"{p}_scales3"], name=f"{p}_scales3")]
    inputs = [f"{table}_Q{bits}", ids, f"{p}_scales3"]
    if f"{table}_zero_points" in inits:  # rtn asymmetric: one zero point per block, unpacked
        inputs.append(_unpacked_zero_points(graph, inits, table, V, kb))
    nodes.append(helper.make_node("GatherBlockQuantized", inputs, [f"{p}_gathered"], name=f"{p}_gather",
                                  domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=block, bits=bits))
    blocks = f"{p}_gathered"
    if f"{table}_offsets" in inits:  # [kb, V]: the token's offsets are its column
        nodes += [helper.make_node("Gather", [f"{table}_offsets", ids], [f"{p}_off_t"], axis=1, name=f"{p}_off"),
                  # [kb, *ids] -> [*ids, kb, 1]
                  helper.make_node("Unsqueeze", [f"{p}_off_t", _const(graph, f"{p}_minus1", [-1])], [f"{p}_off_u"],
                                   name=f"{p}_off_unsqueeze"),
                  helper.make_node("Transpose", [f"{p}_off_u"], [f"{p}_off"],
                                   perm=[*range(1, rank + 1), 0, rank + 1], name=f"{p}_off_transpose")]
        nodes.append(helper.make_node("Add", [blocks, f"{p}_off"], [f"{p}_dequant"], name=f"{p}_add_offset"))
        blocks = f"{p}_dequant"
    flat = out_name if kb * block == K else f"{p}_padded"
    merge = [0] * rank + [-1]  # [*ids, kb, block] -> [*ids, kb*block]
    nodes.append(helper.make_node("Reshape", [blocks, _const(graph, f"{p}_merge", merge)], [flat],
                                  name=f"{p}_merge_blocks"))
    if flat != out_name:  # K not a multiple of the block: drop the padding
        nodes.append(helper.make_node("Slice", [flat, _const(graph, f"{p}_s0", [0]), _const(graph, f"{p}_s1", [K]),
                                                _const(graph, f"{p}_s2", [-1])], [out_name], name=f"{p}_unpad"))
    return nodes


def _unpacked_zero_points(graph, inits, table: str, rows: int, blocks: int) -> str:
    """MatMulNBits packs two 4-bit zero points per byte along the blocks; GatherBlockQuantized over
    [V, blocks, 1] reads one per block (low nibble)."""
    name = f"{table}_zero_points_gather"
    if name not in inits:
        packed = numpy_helper.to_array(inits[f"{table}_zero_points"])
        unpacked = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(rows, -1)[:, :blocks]
        tensor = numpy_helper.from_array(unpacked.reshape(rows, blocks, 1).astype(np.uint8), name)
        graph.initializer.append(tensor)
        inits[name] = tensor
    return name


def _rtn_table(graph, inits, name: str, weight_t: np.ndarray, block_size: int, symmetric: bool) -> None:
    """An untied table [K, V] quantized like onnxruntime's quantizer does a MatMul B."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, \
        DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=4)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight_t.astype(np.float32)))
    arrays = {f"{name}_Q4": packed, f"{name}_scales": scales.astype(weight_t.dtype)}
    if not symmetric:
        arrays[f"{name}_zero_points"] = zero_points
    for tensor_name, array in arrays.items():
        tensor = numpy_helper.from_array(array, tensor_name)
        graph.initializer.append(tensor)
        inits[tensor_name] = tensor


# -- graph helpers ---------------------------------------------------------------------------------
def _const(graph, name: str, values: list[int]) -> str:
    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def _topological_sort(graph) -> None:
    """Order nodes so every input is produced first (Kahn, stable by original position)."""
    import heapq

    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(ordered) != len(nodes):
        raise RuntimeError("quantized graph has a cycle")
    graph.ClearField("node")
    graph.node.extend(ordered)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)


# -- reference for validation ----------------------------------------------------------------------
def dequantized_weights(directory: str | os.PathLike, variant: str = "decode") -> dict[str, np.ndarray]:
    """The float matrices an int4 export really multiplies by, named as before quantization
    (`layers_0_qkv_weight_t` [K, N]; an untied `embed_weight` [V, K]). `kvtrt validate` builds the
    reference of a quantized export from these."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    model = onnx.load(str(directory / manifest.graphs[variant]), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        data = node.input[1] if node.op_type == "MatMulNBits" else node.input[0]
        name = data[:-len("_Q4")]
        if name in out or name + "_scales" not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits = attrs.get("bits", 4)
        if bits not in (4, 8):
            raise ValueError(f"{node.name}: only 4- and 8-bit weights can be dequantized here")
        block = attrs["block_size"]
        packed = inits[data]
        rows = packed.shape[0]
        scales = inits[name + "_scales"].astype(np.float32).reshape(rows, -1)
        kb = scales.shape[1]
        if bits == 8:  # symmetric, zero point 128
            q = packed.reshape(rows, kb, block).astype(np.float32)
            zp = np.full((rows, kb), 128.0, dtype=np.float32)
        else:
            q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(rows, kb, block).astype(np.float32)
            zp = _zero_points4(inits, name, rows, kb)
        blocks = (q - zp[..., None]) * scales[..., None]
        if name + "_offsets" in inits:
            blocks = blocks + inits[name + "_offsets"].astype(np.float32).T[..., None]
        width = attrs["K"] if node.op_type == "MatMulNBits" else manifest.hidden_size
        weight = blocks.reshape(rows, kb * block)[:, :width]  # [N, K]
        out[name] = np.ascontiguousarray(weight if name == "embed_weight" else weight.T)
    return out


def _zero_points4(inits: dict, name: str, rows: int, kb: int) -> np.ndarray:
    """Zero points [rows, kb] of a 4-bit table: stored (packed, or the unpacked copy of an untied
    rtn table) or the implicit 8 of symmetric blocks."""
    if name + "_zero_points_gather" in inits:
        return inits[name + "_zero_points_gather"].reshape(rows, kb).astype(np.float32)
    if name + "_zero_points" in inits:
        zp = inits[name + "_zero_points"].reshape(rows, -1)
        return np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(rows, -1)[:, :kb].astype(np.float32)
    return np.full((rows, kb), 8.0, dtype=np.float32)


__all__ = ["quantize_export", "quantize_model", "quantize_blocks", "quantize_blocks8", "dequantized_weights",
           "METHODS", "SCHEMES"]
