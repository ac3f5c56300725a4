"""kvtrt's own ONNX Runtime CPU kernels, built from C on first use.

`decode_attention.c` is `kvtrt::DecodeAttention` (and `DecodeAttention16` for an fp16 KV cache): one
decode step's attention over the in-place KV buffer, which reads each KV head's cache once for its
whole query group (ORT's GroupQueryAttention reads it once per query head). `library()` compiles it
with the system C compiler into a per-user cache (`$KVTRT_CACHE_DIR`, else `~/.cache/kvtrt`; the temp
folder if that is not writable), keyed by the source, the compiler, its flags and the CPU
(`-march=native`), and returns the path, or None with the reason in `unavailable()` (no compiler, a
failed build: the engine then keeps GroupQueryAttention and says so once; it also keeps it, silently,
where only the slower portable path would run: a CPU with neither AVX-512 nor AVX2, or a head size
other than `HEAD_DIMS`).
`page_ops.c` is FreeKV's page selection and recall on the host, plain C functions called through ctypes
(`cpu_kernels/page_ops.py`), built the same way (`library("page_ops")`).
`with_decode_attention(model)` rewrites the GroupQueryAttention nodes of a `decode_shared` graph (one
new token per row) into this op, with the inputs it reads. Turn it off with `KVTRT_DECODE_KERNEL=0`
(or `kvtrt.load(dir, decode_kernel=False)`), force it with `KVTRT_DECODE_KERNEL=force` (or `True`).
`packed_matmul.c` is `kvtrt.matmul::PackedMatMul`: a MatMul whose constant weight is stored in column
panels (`pack_panels`), as fast as ONNX Runtime's for one row and faster for the few rows of a batched
decode step; `with_packed_matmul(model, names)` rewrites the MatMul nodes that read those weights. The
shared-weight sessions (`ort_shared.SharedWeights`) pack each weight once for all graphs, in place of
ONNX Runtime's prepacked copy. Opt-in, `KVTRT_MATMUL_KERNEL=1` (its AVX-512 path; `force`: also elsewhere
and for weights of any size): it speeds up batched decode steps, but prefill chunks run ~4% slower than
with MLAS (`docs/results/packed_matmul.md`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from ..onnx_bytes import _bytes, _text, _varint
from ..ort_shared import _fields  # protobuf fields of raw model bytes

SOURCES = {name: Path(__file__).with_name(f"{name}.c") for name in ("decode_attention", "page_ops", "packed_matmul")}
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fvisibility=hidden", "-std=c11", "-pthread"]
OPS, DOMAIN = {False: "DecodeAttention", True: "DecodeAttention16"}, "kvtrt"  # by fp16 KV
HEAD_DIMS = (64,)  # head sizes the vector paths cover; others run the portable loops (slower than GQA)
MATMUL_OP, MATMUL_DOMAIN = "PackedMatMul", "kvtrt.matmul"
PANEL = 48  # columns per weight panel (packed_matmul.c's PANEL)
_GQA_INPUTS = (0, 3, 4, 5, 10)  # qkv, past_key, past_value, seqlens_k, attention_bias (GroupQueryAttention's order)

_lock = threading.Lock()
_built: dict[str, Path | None] = {}
_why: list[str] = []


def setting() -> bool | None:
    """`KVTRT_DECODE_KERNEL`: 0 (off, GroupQueryAttention), `force` (the kernel wherever it builds, the
    portable path included, as `decode_kernel=True`), anything else or unset: where a vector path runs."""
    value = os.environ.get("KVTRT_DECODE_KERNEL", "").strip().lower()
    return False if value in ("0", "false", "no", "off") else True if value == "force" else None


def matmul_setting() -> str:
    """`KVTRT_MATMUL_KERNEL`: unset or 0 "off" (ONNX Runtime's MatMul everywhere, the default), 1 "on" (the
    projections, `ort_shared.MIN_PACKED`, through PackedMatMul; needs its AVX-512 path), `force` "force" (every
    MatMul weight of any size, its portable loops included: what the tests run on their tiny models).
    Raises ValueError for any other value."""
    value = os.environ.get("KVTRT_MATMUL_KERNEL", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value == "force":
        return "force"
    raise ValueError(f"KVTRT_MATMUL_KERNEL={value!r} is not a setting: use 0 (ONNX Runtime's MatMul, the default), "
                     "1 (kvtrt's PackedMatMul for the projections) or force (for every MatMul weight)")


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """`weight` [K, N] (float32) in PackedMatMul's layout, as a [K, N] array whose bytes are its column
    panels one after the other: panel p = columns [p*PANEL, (p+1)*PANEL) (the last one narrower when
    PANEL does not divide N), K rows of its width each."""
    K, N = weight.shape
    full = N - N % PANEL
    body = np.ascontiguousarray(weight[:, :full].reshape(K, full // PANEL, PANEL).transpose(1, 0, 2))
    tail = np.ascontiguousarray(weight[:, full:])
    return np.concatenate([body.reshape(-1), tail.reshape(-1)]).reshape(K, N)


def cache_dir() -> Path:
    root = os.environ.get("KVTRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvtrt")
    return Path(root) / "kernels"


def _cpu() -> str:
    """What `-march=native` compiles for: the machine and its CPU flags (a home directory shared by
    machines of different CPUs must not hand one's build to the other)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags.strip()}"


def library(name: str = "decode_attention") -> Path | None:
    """The compiled library of `SOURCES[name]` (built once per source, compiler, flags and CPU), or None
    (see `unavailable`)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    source = SOURCES[name]
    key = f"{compiler} {' '.join(FLAGS)} {cache_dir()} {source}"
    with _lock:
        if key in _built:
            return _built[key]
        _built[key] = path = _build(compiler, source)
        return path


def vectorised(path: Path) -> bool:
    """Whether the library at `path` was built with a vector path (AVX-512 or AVX2). The portable path
    is correct but slower than GroupQueryAttention on long caches (`docs/results/decode_attention.md`),
    so the engine uses it only when asked."""
    import ctypes

    return bool(ctypes.CDLL(str(path)).kvtrt_vectorised())


def unavailable() -> str | None:
    """Why `library()` returned None (None if it did not)."""
    return _why[-1] if _why else None


def _build(compiler: str | None, source: Path) -> Path | None:
    if compiler is None:
        _why.append("no C compiler found (install gcc, or set CC)")
        return None
    digest = hashlib.sha256(source.read_bytes() + " ".join([compiler, *FLAGS, _cpu()]).encode()).hexdigest()[:16]
    name = f"{source.stem}-{digest}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"kvtrt-kernels-{os.getuid()}"):
        if (folder / name).exists():
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return _compile(compiler, source, folder / name)
        except OSError as error:  # a read-only or full cache: the next place, then say why
            reason = f"cannot write the kernel to {folder}: {error}"
    _why.append(reason)
    return None


def _compile(compiler: str, source: Path, target: Path) -> Path | None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            run = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], capture_output=True,
                                 text=True)
        except OSError as error:
            _why.append(f"cannot run the C compiler {compiler!r}: {error}")
            return None
        if run.returncode != 0:
            _why.append(f"{compiler} could not build {source.name}: {run.stderr.strip()[-400:]}")
            return None
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


def warn_unavailable() -> None:
    """Say once per process that decode attention stays on GroupQueryAttention, and why."""
    if not getattr(warn_unavailable, "said", False):
        warn_unavailable.said = True
        warnings.warn(f"kvtrt's decode attention kernel is not available ({unavailable()}); decoding uses "
                      f"ONNX Runtime's GroupQueryAttention (equal outputs to rounding; slower on long caches "
                      f"and batches)", RuntimeWarning, stacklevel=3)


# --- the graph rewrite, on protobuf bytes (the runtime does not depend on the onnx package) ---

def with_decode_attention(model: bytes, half: bool = False) -> bytes:
    """ONNX model bytes with every com.microsoft GroupQueryAttention node of the main graph replaced by
    kvtrt::DecodeAttention (`half`: DecodeAttention16, for the fp16 graphs of an fp16-KV export; same
    outputs and attributes; inputs qkv, past K/V, seqlens, bias) and the kvtrt opset imported. Raises
    ValueError if the graph has no such node or one reads separate key/value inputs (the in-place
    decode graph packs q, k and v)."""
    return _rewrite_nodes(model, lambda node: _decode_node(model, node, OPS[half])
                          if _op_type(model, node) == "GroupQueryAttention" else None,
                          DOMAIN, "the graph has no GroupQueryAttention node to replace")


def with_packed_matmul(model: bytes, weights: set[str]) -> bytes:
    """ONNX model bytes with every MatMul node of the main graph whose weight (input 1) is one of
    `weights` turned into kvtrt.matmul::PackedMatMul (same inputs and output; the session must then be
    given those weights packed, `pack_panels`), and that opset imported. Raises ValueError if no node
    reads one of them."""
    return _rewrite_nodes(model, lambda node: _retyped(model, node, MATMUL_OP, MATMUL_DOMAIN)
                          if _op_type(model, node) == "MatMul" and _input(model, node, 1) in weights else None,
                          MATMUL_DOMAIN, "the graph has no MatMul node reading the weights to pack")


def _rewrite_nodes(model: bytes, replace, domain: str, missing: str) -> bytes:
    """`model` with each node of the main graph for which `replace(node)` returns bytes replaced by them
    (None: kept) and `domain` imported at version 1; ValueError(`missing`) if no node was replaced."""
    out, replaced = bytearray(), 0
    for field, wire, value in _fields(model):
        if field == 7 and wire == 2:  # ModelProto.graph
            graph = bytearray()
            for gfield, gwire, gvalue in _fields(model, *value):
                new = replace(gvalue) if gfield == 1 and gwire == 2 else None  # GraphProto.node
                if new is not None:
                    graph += _bytes(1, new)
                    replaced += 1
                else:
                    graph += _raw(model, gfield, gwire, gvalue)
            out += _bytes(7, bytes(graph))
        else:
            out += _raw(model, field, wire, value)
    if not replaced:
        raise ValueError(missing)
    out += _bytes(8, _text(1, domain) + _varint(2, 1))  # ModelProto.opset_import
    return bytes(out)


def _input(buf: bytes, node: tuple[int, int], index: int) -> str:
    inputs = [buf[v[0]:v[1]].decode() for f, w, v in _fields(buf, *node) if f == 1 and w == 2]
    return inputs[index] if index < len(inputs) else ""


def _retyped(buf: bytes, node: tuple[int, int], op: str, domain: str) -> bytes:
    """NodeProto bytes of `node` with op_type `op` in `domain` (inputs, outputs, name, attributes kept)."""
    kept = b"".join(_raw(buf, f, w, v) for f, w, v in _fields(buf, *node) if f not in (4, 7))
    return kept + _text(4, op) + _text(7, domain)


def _op_type(buf: bytes, node: tuple[int, int]) -> str:
    return next((buf[v[0]:v[1]].decode() for f, w, v in _fields(buf, *node) if f == 4 and w == 2), "")


def _decode_node(buf: bytes, node: tuple[int, int], op: str) -> bytes:
    inputs, rest = [], bytearray()
    for f, w, v in _fields(buf, *node):
        if f == 1 and w == 2:
            inputs.append(buf[v[0]:v[1]].decode())
        elif f in (2, 3, 5) and w == 2:  # outputs, name, attributes: kept
            rest += _raw(buf, f, w, v)
    if len(inputs) <= max(_GQA_INPUTS) or inputs[1] or inputs[2] or not all(inputs[i] for i in _GQA_INPUTS):
        raise ValueError("a GroupQueryAttention node does not read packed qkv, past K/V, seqlens and a bias")
    return b"".join(_text(1, inputs[i]) for i in _GQA_INPUTS) + bytes(rest) + _text(4, op) + _text(7, DOMAIN)


def _raw(buf: bytes, field: int, wire: int, value) -> bytes:
    """Field `field` re-encoded as `_fields` read it (varints and length-delimited; no fixed-width here)."""
    if wire == 2:
        return _bytes(field, buf[value[0]:value[1]])
    if wire == 0:
        return _varint(field, value)
    raise ValueError(f"unexpected protobuf wire type {wire} in a graph")
