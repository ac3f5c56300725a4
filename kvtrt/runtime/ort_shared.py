"""CPU sessions that hold one prepacked copy of the weights per process.

ONNX Runtime's CPU kernels "prepack" their constant weights at session creation (MLAS GEMM layout
for fp32 MatMul, the block layout of int4 MatMulNBits): a second copy of the weights per session,
so an export's prefill and decode graphs held two (~600 MB each for SmolLM2 fp32). ORT shares
prepacked weights between sessions only for *shared initializers* (user-owned tensors added to the
session options) and only through a `PrepackedWeightsContainer` passed at session creation. The
Python API has shared initializers but no container, so this module creates the CPU sessions
through ORT's C API (ctypes over the `libonnxruntime.so` that the onnxruntime wheel ships beside
its Python extension), with:

- one read-only mapping of `weights.bin`; every external initializer of every graph is an OrtValue
  over its slice of that mapping, added to the options of each session (`AddInitializer`);
- one `PrepackedWeightsContainer` for all sessions of the engine: the first session prepacks, the
  next (loaded now or on first use) finds the same packed buffers by content hash and keeps none of
  its own;
- after each session is created, `madvise(MADV_DONTNEED)` on the mapping: the pages prepacking
  read leave the resident set; the few weights read unpacked (embedding rows, norm scales) fault
  back in from the page cache as they are used.

The objects returned mimic the parts of `onnxruntime.InferenceSession` / `IOBinding` that
`OrtEngine` uses (`get_inputs`, `get_outputs`, `io_binding`, `run_with_iobinding`, `bind_input`,
`bind_output`), so binding and running are unchanged. `available()` is False when the library
or an entry point is missing; the engine then falls back to one Python session per graph.
"""

from __future__ import annotations

import ctypes as C
import glob
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# Indices of the OrtApi function table (onnxruntime_c_api.h; the table only ever grows).
_FUNCS = {
    "GetErrorMessage": (2, C.c_char_p, [C.c_void_p]),
    "CreateEnv": (3, C.c_void_p, [C.c_int, C.c_char_p, C.c_void_p]),
    "CreateSessionOptions": (10, C.c_void_p, [C.c_void_p]),
    "SetSessionExecutionMode": (13, C.c_void_p, [C.c_void_p, C.c_int]),
    "SetSessionLogSeverityLevel": (22, C.c_void_p, [C.c_void_p, C.c_int]),
    "SetSessionGraphOptimizationLevel": (23, C.c_void_p, [C.c_void_p, C.c_int]),
    "SetIntraOpNumThreads": (24, C.c_void_p, [C.c_void_p, C.c_int]),
    "SetInterOpNumThreads": (25, C.c_void_p, [C.c_void_p, C.c_int]),
    "SessionGetInputCount": (30, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "SessionGetOutputCount": (31, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "SessionGetInputTypeInfo": (33, C.c_void_p, [C.c_void_p, C.c_size_t, C.c_void_p]),
    "SessionGetOutputTypeInfo": (34, C.c_void_p, [C.c_void_p, C.c_size_t, C.c_void_p]),
    "SessionGetInputName": (36, C.c_void_p, [C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p]),
    "SessionGetOutputName": (37, C.c_void_p, [C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p]),
    "CreateRunOptions": (39, C.c_void_p, [C.c_void_p]),
    "CreateTensorWithDataAsOrtValue": (49, C.c_void_p, [C.c_void_p, C.c_void_p, C.c_size_t, C.c_void_p,
                                                         C.c_size_t, C.c_int, C.c_void_p]),
    "CastTypeInfoToTensorInfo": (55, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "GetTensorElementType": (60, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "GetDimensionsCount": (61, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "GetDimensions": (62, C.c_void_p, [C.c_void_p, C.c_void_p, C.c_size_t]),
    "CreateCpuMemoryInfo": (69, C.c_void_p, [C.c_int, C.c_int, C.c_void_p]),
    "AllocatorFree": (76, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "GetAllocatorWithDefaultOptions": (78, C.c_void_p, [C.c_void_p]),
    "ReleaseStatus": (93, None, [C.c_void_p]),
    "ReleaseSession": (95, None, [C.c_void_p]),
    "ReleaseValue": (96, None, [C.c_void_p]),
    "ReleaseRunOptions": (97, None, [C.c_void_p]),
    "ReleaseTypeInfo": (98, None, [C.c_void_p]),
    "ReleaseSessionOptions": (100, None, [C.c_void_p]),
    "AddSessionConfigEntry": (130, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_char_p]),
    "RunWithBinding": (133, C.c_void_p, [C.c_void_p, C.c_void_p, C.c_void_p]),
    "CreateIoBinding": (134, C.c_void_p, [C.c_void_p, C.c_void_p]),
    "ReleaseIoBinding": (135, None, [C.c_void_p]),
    "BindInput": (136, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_void_p]),
    "BindOutput": (137, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_void_p]),
    "AddInitializer": (150, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_void_p]),
    "AddRunConfigEntry": (165, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_char_p]),
    "CreatePrepackedWeightsContainer": (166, C.c_void_p, [C.c_void_p]),
    "ReleasePrepackedWeightsContainer": (167, None, [C.c_void_p]),
    "CreateSessionWithPrepackedWeightsContainer": (168, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_void_p,
                                                                     C.c_void_p, C.c_void_p]),
    "CreateSessionFromArrayWithPrepackedWeightsContainer": (169, C.c_void_p, [C.c_void_p, C.c_char_p, C.c_size_t,
                                                                              C.c_void_p, C.c_void_p, C.c_void_p]),
    "RegisterCustomOpsLibrary_V2": (228, C.c_void_p, [C.c_void_p, C.c_char_p]),
}
_API_VERSION = 20  # any version the installed library serves; the entries above are all older
_ONNX_TYPES = {1: "float", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "double"}
_NP_TO_ONNX = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
               np.dtype(np.int64): 7, np.dtype(np.bool_): 9, np.dtype(np.float16): 10}


class _Api:
    """The OrtApi function table of the wheel's libonnxruntime.so, one per process."""

    def __init__(self):
        import onnxruntime

        capi = Path(onnxruntime.__file__).parent / "capi"
        found = sorted(glob.glob(str(capi / "libonnxruntime.so*")))
        if not found:
            raise OSError(f"no libonnxruntime.so in {capi}")
        lib = C.CDLL(found[0])

        class ApiBase(C.Structure):
            _fields_ = [("GetApi", C.CFUNCTYPE(C.c_void_p, C.c_uint32)),
                        ("GetVersionString", C.CFUNCTYPE(C.c_char_p))]

        lib.OrtGetApiBase.restype = C.POINTER(ApiBase)
        base = lib.OrtGetApiBase().contents
        version = base.GetVersionString().decode()
        if version != onnxruntime.__version__.split("+")[0]:
            raise OSError(f"{found[0]} is onnxruntime {version}, the Python package {onnxruntime.__version__}")
        table = base.GetApi(_API_VERSION)
        if not table:
            raise OSError(f"onnxruntime {version} does not serve C API version {_API_VERSION}")
        table = C.cast(table, C.POINTER(C.c_void_p))
        self.lib = lib
        for name, (index, restype, argtypes) in _FUNCS.items():
            setattr(self, name, C.CFUNCTYPE(restype, *argtypes)(table[index]))
        self.env = C.c_void_p()
        self.check(self.CreateEnv(3, b"kvtrt", C.byref(self.env)))  # 3 = ERROR
        self.cpu = C.c_void_p()
        self.check(self.CreateCpuMemoryInfo(0, 0, C.byref(self.cpu)))  # device allocator, default mem type
        self.allocator = C.c_void_p()
        self.check(self.GetAllocatorWithDefaultOptions(C.byref(self.allocator)))
        probe = C.c_void_p()
        self.check(self.CreateSessionOptions(C.byref(probe)))
        try:
            _priority_order(self, probe)  # raises if the options layout is not the expected one
        finally:
            self.ReleaseSessionOptions(probe)

    def check(self, status) -> None:
        if status:
            message = self.GetErrorMessage(status).decode(errors="replace")
            self.ReleaseStatus(status)
            raise RuntimeError(f"onnxruntime: {message}")

    def tensor(self, address: int, nbytes: int, shape, onnx_type: int) -> C.c_void_p:
        """An OrtValue over caller-owned memory (ReleaseValue frees the value, not the memory)."""
        dims = (C.c_int64 * len(shape))(*shape)
        value = C.c_void_p()
        self.check(self.CreateTensorWithDataAsOrtValue(self.cpu, address, nbytes, dims, len(shape), onnx_type,
                                                       C.byref(value)))
        return value


_api: _Api | None = None
_api_error: str | None = None
_api_lock = threading.Lock()


def api() -> _Api:
    global _api, _api_error
    with _api_lock:
        if _api is None and _api_error is None:
            try:
                _api = _Api()
            except (OSError, AttributeError, RuntimeError) as error:
                _api_error = str(error)
        if _api is None:
            raise RuntimeError(f"onnxruntime's C API is not usable here: {_api_error}")
        return _api


def available() -> bool:
    try:
        api()
        return True
    except RuntimeError:
        return False


# --- the external initializers of an ONNX file, read from its protobuf without the onnx package ---

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of a protobuf message; length-delimited values as (start, end)."""
    i, end = start, len(buf) if end is None else end
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = (i, i + n), i + n
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    dims: tuple[int, ...]
    data_type: int
    location: str
    offset: int
    length: int


def external_initializers(path: str | os.PathLike) -> list[ExternalTensor]:
    """The initializers of the main graph of ONNX file `path` whose data is in an external file."""
    buf = Path(path).read_bytes()
    out = []
    for field, wire, graph in _fields(buf):
        if field != 7 or wire != 2:  # ModelProto.graph
            continue
        for gfield, gwire, tensor in _fields(buf, *graph):
            if gfield != 5 or gwire != 2:  # GraphProto.initializer
                continue
            dims, data_type, name, external, location_kind = [], 0, "", {}, 0
            for tfield, twire, value in _fields(buf, *tensor):
                if tfield == 1:  # dims, packed or not
                    if twire == 0:
                        dims.append(value)
                    else:
                        i, stop = value
                        while i < stop:
                            d, i = _varint(buf, i)
                            dims.append(d)
                elif tfield == 2:
                    data_type = value
                elif tfield == 8:
                    name = buf[value[0]:value[1]].decode()
                elif tfield == 13:  # external_data: StringStringEntryProto
                    entry = {f: buf[v[0]:v[1]].decode() for f, _, v in _fields(buf, *value)}
                    external[entry.get(1, "")] = entry.get(2, "")
                elif tfield == 14:
                    location_kind = value
            if location_kind == 1 and "location" in external:  # TensorProto.EXTERNAL
                dims = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)
                out.append(ExternalTensor(name, dims, data_type, external["location"],
                                          int(external.get("offset", 0)), int(external["length"])))
    return out


def _ops_by_input(buf: bytes, graph: tuple[int, int]) -> dict[str, list[tuple[str, int]]]:
    """input name -> [(op_type, input index)] of the nodes of a GraphProto span."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for gfield, gwire, node in _fields(buf, *graph):
        if gfield != 1 or gwire != 2:  # GraphProto.node
            continue
        inputs, op_type = [], ""
        for nfield, nwire, value in _fields(buf, *node):
            if nfield == 1 and nwire == 2:  # NodeProto.input
                inputs.append(buf[value[0]:value[1]].decode())
            elif nfield == 4 and nwire == 2:  # NodeProto.op_type
                op_type = buf[value[0]:value[1]].decode()
        for i, name in enumerate(inputs):
            uses.setdefault(name, []).append((op_type, i))
    return uses


def tied_matmul_weights(path: str | os.PathLike) -> list[ExternalTensor]:
    """The fp32 external initializers that a `Gather` reads (an embedding lookup) and that are also the
    weight (input 1) of a `MatMul`: a tied embedding / lm_head. Prepacking such a MatMul keeps a second,
    packed copy while the Gather keeps reading the original, whose pages the lookups fault into the
    resident set anyway (a [hidden, vocab] table is read across its whole width by every token)."""
    buf = Path(path).read_bytes()
    graph = next((v for f, w, v in _fields(buf) if f == 7 and w == 2), None)
    if graph is None:
        return []
    uses = _ops_by_input(buf, graph)
    return [t for t in external_initializers(path) if t.data_type == 1
            and any(op == "Gather" for op, _ in uses.get(t.name, ()))
            and ("MatMul", 1) in uses.get(t.name, ())]


MIN_PACKED = 256  # rows and columns a MatMul weight needs for `packed_matmul_weights` (the projections)


def packed_matmul_weights(path: str | os.PathLike, smallest: int = MIN_PACKED) -> list[ExternalTensor]:
    """The fp32 [K, N] external initializers (K, N >= `smallest`) that only MatMul nodes read, as their
    weight (input 1): what kvtrt's PackedMatMul can take over with the weight packed in its layout
    (`cpu_kernels.with_packed_matmul`). A tied embedding table (also read by a Gather) is not one."""
    buf = Path(path).read_bytes()
    graph = next((v for f, w, v in _fields(buf) if f == 7 and w == 2), None)
    if graph is None:
        return []
    uses = _ops_by_input(buf, graph)
    return [t for t in external_initializers(path) if t.data_type == 1 and len(t.dims) == 2
            and min(t.dims) >= smallest and uses.get(t.name)
            and all(use == ("MatMul", 1) for use in uses[t.name])]


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _message(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


def _value_info(tensor: ExternalTensor) -> bytes:
    """ValueInfoProto {name, type: TypeProto {tensor_type: {elem_type, shape}}}."""
    shape = b"".join(_message(1, _encode_varint(1 << 3) + _encode_varint(d)) for d in tensor.dims)
    tensor_type = _encode_varint(1 << 3) + _encode_varint(tensor.data_type) + _message(2, shape)
    return _message(1, tensor.name.encode()) + _message(2, _message(1, tensor_type))


def with_graph_inputs(buf: bytes, tensors: list[ExternalTensor]) -> bytes:
    """ONNX model bytes `buf` with `tensors` (initializers of its main graph) also declared as graph
    inputs: ONNX Runtime then treats them as overridable, so it neither prepacks nor constant-folds
    them; a run that does not bind them uses the initializer."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, i = _varint(buf, i)
            if field == 7:  # ModelProto.graph
                graph = buf[i:i + n] + b"".join(_message(11, _value_info(t)) for t in tensors)  # GraphProto.input
                return buf[:start] + _message(7, graph) + buf[i + n:]
            i += n
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    raise ValueError("the model has no graph")


# --- sessions ---

class RunOptions:
    """`onnxruntime.RunOptions` for these sessions (only what the engine uses: config entries)."""

    def __init__(self):
        self._api = api()
        self.handle = C.c_void_p()
        self._api.check(self._api.CreateRunOptions(C.byref(self.handle)))

    def add_run_config_entry(self, key: str, value: str) -> None:
        self._api.check(self._api.AddRunConfigEntry(self.handle, key.encode(), value.encode()))

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self._api.ReleaseRunOptions(self.handle)
            self.handle = None


@dataclass
class NodeArg:
    """What `onnxruntime.NodeArg` gives the engine: name, shape (None for a symbolic dim), type."""
    name: str
    shape: list
    type: str


class Binding:
    """An IO binding of one caller (mimics `onnxruntime.IOBinding` for CPU tensors)."""

    def __init__(self, session: "Session"):
        self._api = session._api
        self._session = session
        self.handle = C.c_void_p()
        self._api.check(self._api.CreateIoBinding(session.handle, C.byref(self.handle)))

    def _bind(self, fn, name: str, device_type: str, device_id: int, element_type, shape, buffer_ptr: int) -> None:
        if device_type != "cpu":
            raise ValueError("shared-weight sessions bind CPU tensors only")
        dtype = np.dtype(element_type)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        value = self._api.tensor(buffer_ptr, nbytes, shape, _NP_TO_ONNX[dtype])
        try:
            self._api.check(fn(self.handle, name.encode(), value))  # the binding keeps its own reference
        finally:
            self._api.ReleaseValue(value)

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr) -> None:
        self._bind(self._api.BindInput, name, device_type, device_id, element_type, shape, buffer_ptr)

    def bind_output(self, name, device_type, device_id, element_type, shape, buffer_ptr) -> None:
        self._bind(self._api.BindOutput, name, device_type, device_id, element_type, shape, buffer_ptr)

    def synchronize_outputs(self) -> None:  # CPU: nothing to wait for
        pass

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self._api.ReleaseIoBinding(self.handle)
            self.handle = None


class Session:
    """One graph's session (mimics the parts of `onnxruntime.InferenceSession` the engine uses)."""

    def __init__(self, api_: _Api, handle: C.c_void_p, options: C.c_void_p, owner: "SharedWeights"):
        self._api = api_
        self.handle = handle
        self._options = options
        self._owner = owner  # the mapping, initializer values and container must outlive the session
        self._inputs = self._args(api_.SessionGetInputCount, api_.SessionGetInputName, api_.SessionGetInputTypeInfo)
        self._outputs = self._args(api_.SessionGetOutputCount, api_.SessionGetOutputName,
                                   api_.SessionGetOutputTypeInfo)

    def _args(self, count_fn, name_fn, type_fn) -> list[NodeArg]:
        a = self._api
        n = C.c_size_t()
        a.check(count_fn(self.handle, C.byref(n)))
        out = []
        for i in range(n.value):
            raw = C.c_void_p()
            a.check(name_fn(self.handle, i, a.allocator, C.byref(raw)))
            name = C.string_at(raw.value).decode()
            a.check(a.AllocatorFree(a.allocator, raw))
            info = C.c_void_p()
            a.check(type_fn(self.handle, i, C.byref(info)))
            try:
                tensor = C.c_void_p()
                a.check(a.CastTypeInfoToTensorInfo(info, C.byref(tensor)))
                elem, ndim = C.c_int(), C.c_size_t()
                a.check(a.GetTensorElementType(tensor, C.byref(elem)))
                a.check(a.GetDimensionsCount(tensor, C.byref(ndim)))
                dims = (C.c_int64 * ndim.value)()
                a.check(a.GetDimensions(tensor, dims, ndim.value))
            finally:
                a.ReleaseTypeInfo(info)
            out.append(NodeArg(name, [d if d >= 0 else None for d in dims],
                               f"tensor({_ONNX_TYPES.get(elem.value, elem.value)})"))
        return out

    def get_inputs(self) -> list[NodeArg]:
        return self._inputs

    def get_outputs(self) -> list[NodeArg]:
        return self._outputs

    def io_binding(self) -> Binding:
        return Binding(self)

    def run_with_iobinding(self, binding: Binding, run_options: "RunOptions | None" = None) -> None:
        options = None if run_options is None else run_options.handle
        self._api.check(self._api.RunWithBinding(self.handle, options, binding.handle))

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self._api.ReleaseSession(self.handle)
            self._api.ReleaseSessionOptions(self._options)
            self.handle = None


class SharedWeights:
    """The CPU sessions of one export folder, sharing one mapping of the weights file and one set
    of prepacked weights. `config`: session config entries; `threads`: intra-op threads."""

    def __init__(self, directory: str | os.PathLike, weights_file: str, threads: int, config: dict[str, str],
                 unpack_tied: bool = True, packed_matmul: Path | None = None, packed_min: int | None = None):
        """`unpack_tied`: leave a tied embedding / lm_head MatMul weight unpacked (`tied_matmul_weights`):
        the MatMul reads the mapping the embedding Gather reads, so that table is held once.
        `packed_matmul`: the `cpu_kernels` library of kvtrt's PackedMatMul; the MatMuls of every graph
        that read a `packed_matmul_weights` weight then run it, over one copy of that weight packed in
        its panels (made on first use, shared by all sessions; ONNX Runtime prepacks none of them);
        `packed_min`: the smallest K and N it takes (default MIN_PACKED)."""
        self._api = api()
        self.unpack_tied = unpack_tied
        self.packed_matmul = packed_matmul
        self.packed_min = MIN_PACKED if packed_min is None else packed_min
        self._packed: dict[str, np.ndarray] = {}  # weight name -> its panels (`cpu_kernels.pack_panels`)
        self.unpacked: set[str] = set()  # initializers some session reads unpacked
        self.directory = Path(directory)
        self.threads = threads
        self.config = dict(config)
        self.weights_path = self.directory / weights_file
        with open(self.weights_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = np.frombuffer(self._map, dtype=np.uint8).ctypes.data
        self._values: dict[str, C.c_void_p] = {}  # initializer name -> OrtValue over the mapping
        self.container = C.c_void_p()
        self._api.check(self._api.CreatePrepackedWeightsContainer(C.byref(self.container)))

    def _options(self, graph: Path, packed: set[str]) -> C.c_void_p:
        """Session options over the shared initializers; the weights named in `packed` given packed."""
        a = self._api
        options = C.c_void_p()
        a.check(a.CreateSessionOptions(C.byref(options)))
        try:
            a.check(a.SetSessionGraphOptimizationLevel(options, 99))  # ORT_ENABLE_ALL
            a.check(a.SetIntraOpNumThreads(options, self.threads))
            a.check(a.SetInterOpNumThreads(options, 1))
            a.check(a.SetSessionLogSeverityLevel(options, 3))
            for key, value in self.config.items():
                a.check(a.AddSessionConfigEntry(options, key.encode(), value.encode()))
            _priority_order(a, options)
            for t in external_initializers(graph):
                if (self.directory / t.location).resolve() != self.weights_path.resolve():
                    continue
                if t.offset + t.length > len(self._map):
                    raise ValueError(f"{graph.name}: initializer {t.name} lies outside {self.weights_path.name}")
                key = (t.name, t.name in packed)
                value = self._values.get(key)
                if value is None and key[1]:
                    panels = self._pack(t)
                    value = self._values[key] = a.tensor(panels.ctypes.data, panels.nbytes, t.dims, t.data_type)
                elif value is None:
                    value = self._values[key] = a.tensor(self._base + t.offset, t.length, t.dims, t.data_type)
                a.check(a.AddInitializer(options, t.name.encode(), value))
        except BaseException:
            a.ReleaseSessionOptions(options)
            raise
        return options

    @property
    def packed_names(self) -> set[str]:
        """The weights some session reads packed (through PackedMatMul)."""
        return set(self._packed)

    def _pack(self, t: ExternalTensor) -> np.ndarray:
        """Weight `t` packed in PackedMatMul's panels (once per process and engine), its pages of the
        mapping dropped from the resident set right after (the packed copy is the one kept)."""
        from .cpu_kernels import pack_panels

        if t.name not in self._packed:
            weight = np.frombuffer(self._map, dtype=np.float32, count=t.length // 4, offset=t.offset)
            self._packed[t.name] = pack_panels(weight.reshape(t.dims))
            del weight
            start = t.offset - t.offset % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.length - start)
        return self._packed[t.name]

    def session(self, graph: str | os.PathLike, unpack_tied: bool | None = None,
                rewrite: Callable[[bytes], bytes] | None = None, custom_ops: Path | None = None) -> Session:
        """A session of `graph`; `unpack_tied` overrides the instance's choice for this session (a
        session that prepacks the tied weight adds that packed copy to the container); `rewrite`
        edits the model bytes before the session is made (e.g. `cpu_kernels.with_decode_attention`),
        `custom_ops` a library of the ops it then needs."""
        a = self._api
        graph = Path(graph)
        packed = {t.name for t in packed_matmul_weights(graph, self.packed_min)
                  if (self.directory / t.location).resolve() == self.weights_path.resolve()} \
            if self.packed_matmul is not None else set()
        options = self._options(graph, packed)
        for library in ([custom_ops] if custom_ops is not None else []) + ([self.packed_matmul] if packed else []):
            try:
                a.check(a.RegisterCustomOpsLibrary_V2(options, str(library).encode()))
            except BaseException:
                a.ReleaseSessionOptions(options)
                raise
        unpack = self.unpack_tied if unpack_tied is None else unpack_tied
        tied = [t for t in tied_matmul_weights(graph)
                if (self.directory / t.location).resolve() == self.weights_path.resolve()] if unpack else []
        model = None
        if tied or packed or rewrite is not None:
            # declared graph inputs, these initializers are not prepacked; the model comes from bytes, so
            # tell ORT where its external data lives (every external initializer is added above anyway)
            model = with_graph_inputs(graph.read_bytes(), tied) if tied else graph.read_bytes()
            model = rewrite(model) if rewrite is not None else model
            if packed:
                from .cpu_kernels import with_packed_matmul

                model = with_packed_matmul(model, packed)
            try:
                a.check(a.AddSessionConfigEntry(options, b"session.model_external_initializers_file_folder_path",
                                                str(graph.parent).encode()))
            except BaseException:
                a.ReleaseSessionOptions(options)
                raise
        handle = C.c_void_p()
        # Prepacking reads every weight through the mapping: while it runs, drop the pages it has
        # read from the resident set every 50 ms (they stay in the page cache; a page still being
        # read faults back in), so loading peaks near one copy instead of the mapped file plus the
        # packed copy (SmolLM2 fp32: ~0.55 GB less at peak).
        done = threading.Event()

        def trim():
            while not done.wait(0.05):
                self._map.madvise(mmap.MADV_DONTNEED)

        trimmer = threading.Thread(target=trim, name="kvtrt-weights-trim", daemon=True)
        trimmer.start()
        try:
            if model is None:
                a.check(a.CreateSessionWithPrepackedWeightsContainer(a.env, str(graph).encode(), options,
                                                                     self.container, C.byref(handle)))
            else:
                a.check(a.CreateSessionFromArrayWithPrepackedWeightsContainer(a.env, model, len(model), options,
                                                                              self.container, C.byref(handle)))
        except BaseException:
            a.ReleaseSessionOptions(options)
            raise
        finally:
            done.set()
            trimmer.join()
            self._map.madvise(mmap.MADV_DONTNEED)
        self.unpacked.update(t.name for t in tied)
        return Session(a, handle, options, self)

    def __del__(self):
        a = getattr(self, "_api", None)
        if a is None:
            return
        for value in getattr(self, "_values", {}).values():
            a.ReleaseValue(value)
        self._values = {}
        if getattr(self, "container", None) and self.container.value:
            a.ReleasePrepackedWeightsContainer(self.container)
            self.container = None


def _priority_order(a: _Api, options: C.c_void_p) -> None:
    """Set the session's execution order to PRIORITY_BASED, which the C API does not expose.

    `OrtSessionOptions` starts with `onnxruntime::SessionOptions`, whose first two members are
    `execution_mode` and `execution_order` (int enums). The layout is checked through the one we
    can set (`SetSessionExecutionMode`) before the second is written; if it does not read back as
    expected nothing is written and the error says so."""
    fields = C.cast(options, C.POINTER(C.c_int32))
    a.check(a.SetSessionExecutionMode(options, 1))  # ORT_PARALLEL
    parallel = fields[0]
    a.check(a.SetSessionExecutionMode(options, 0))  # ORT_SEQUENTIAL
    if parallel != 1 or fields[0] != 0 or fields[1] != 0:
        raise RuntimeError("onnxruntime's SessionOptions layout is not the expected one; cannot set the "
                           "priority-based execution order")
    fields[1] = 1  # ExecutionOrder::PRIORITY_BASED
