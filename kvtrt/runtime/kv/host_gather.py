"""float16 <-> float32 on the host with ONNX Runtime: recalls from and writes to an fp16 page pool.

A recall from an fp16 page pool (FreeKV's default) gathers the missing pages and widens them to the
view's float32; storing a prompt's pages narrows its float32 KV. numpy's float16 casts are scalar
code (~0.55 G values/s here: 5 ms for one step's ~700 pages, more than the step's whole selection,
and ~0.3 s to store a 7680-token prompt), while ONNX Runtime's Cast is vectorized (F16C): two tiny
graphs, ``Cast(Gather(data, rows))`` and ``Cast(x)``, do it at ~25x the speed, bit for bit. They are
written as protobuf bytes (``runtime/onnx_bytes.py``: the runtime does not depend on the ``onnx`` package);
``tests/test_host_gather.py`` checks them with ``onnx.checker`` and against numpy.
"""

from __future__ import annotations

import threading

import numpy as np

from ..onnx_bytes import FLOAT, FLOAT16, INT64, graph, model, node, value

_LOCK = threading.Lock()


def gather_widened(data: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``data[rows]`` as float32: ``data`` ``[R, ...]`` float16 (C-contiguous), ``rows`` ``[n]`` int64
    -> ``[n, ...]`` float32, exactly ``data[rows].astype(np.float32)``."""
    tail = data.shape[1:]
    flat = data.reshape(data.shape[0], -1)  # (a view: the pool is contiguous)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty((len(rows), flat.shape[1]), np.float32)
    if len(rows):
        session = _session()
        binding = session.io_binding()
        binding.bind_input("data", "cpu", 0, np.float16, flat.shape, flat.ctypes.data)
        binding.bind_input("rows", "cpu", 0, np.int64, rows.shape, rows.ctypes.data)
        binding.bind_output("out", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        session.run_with_iobinding(binding)
    return out.reshape(len(rows), *tail)


def narrowed(x: np.ndarray) -> np.ndarray:
    """``x`` (float32) as a new C-contiguous float16 array, exactly ``x.astype(np.float16)``
    (round to nearest even; what a pool's pages are stored as)."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # (callers pass one head's tokens: contiguous, no copy)
    out = np.empty(x.shape, np.float16)
    if x.size:
        session = _session("narrow")
        binding = session.io_binding()
        binding.bind_input("x", "cpu", 0, np.float32, (x.size,), x.ctypes.data)
        binding.bind_output("y", "cpu", 0, np.float16, (x.size,), out.ctypes.data)
        session.run_with_iobinding(binding)
    return out


_SESSIONS: dict = {}


def _session(name: str = "gather"):
    with _LOCK:
        if name not in _SESSIONS:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # it runs beside the decode graph (FreeKV's worker thread)
            options.inter_op_num_threads = 1
            model = model_bytes() if name == "gather" else narrow_model_bytes()
            _SESSIONS[name] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return _SESSIONS[name]


# ---------------------------------------------------------------------------- the graphs, as protobuf
def model_bytes() -> bytes:
    """ModelProto: ``out = Cast(Gather(data, rows, axis=0), to=float)``, opset 17, IR version 8;
    ``data`` ``[R, C]`` float16, ``rows`` ``[n]`` int64, ``out`` ``[n, C]`` float32."""
    nodes = [node("Gather", ["data", "rows"], ["gathered"], axis=0), node("Cast", ["gathered"], ["out"], to=FLOAT)]
    return model(graph("gather_widened", nodes, [value("data", FLOAT16, ["R", "C"]), value("rows", INT64, ["n"])],
                       [value("out", FLOAT, ["n", "C"])]), {"": 17})


def narrow_model_bytes() -> bytes:
    """ModelProto: ``y = Cast(x, to=float16)``, ``x`` ``[N]`` float32, ``y`` ``[N]`` float16."""
    return model(graph("narrowed", [node("Cast", ["x"], ["y"], to=FLOAT16)], [value("x", FLOAT, ["N"])],
                       [value("y", FLOAT16, ["N"])]), {"": 17})
