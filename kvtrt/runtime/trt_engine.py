"""`TrtEngine`: the `Engine` protocol over TensorRT engines built by `kvtrt build-engine`.

UNVERIFIED: written to the documented TensorRT 10/11 Python API (`Runtime.deserialize_cuda_engine`,
`IExecutionContext.set_input_shape` / `set_tensor_address` / `execute_async_v3`) and never run here
(this machine has no GPU). `tensorrt` is imported lazily; install it with `pip install 'kvtrt[trt]'`.

Design:
- One engine per graph (prefill, decode), loaded from `DIR/trt/{graph}.engine`, each with the one
  optimization profile `kvtrt.export.trt` built it with; shapes outside it get a clear error
  naming the input, its shape and the profile's range (before TensorRT sees them).
- One execution context per engine, shared by all callers under a lock (a context is not
  thread-safe and holds the activation memory); `new_binding` is cheap (a dict).
- Tensors are torch CUDA tensors bound by pointer (`set_tensor_address`), no copies, except that
  an input view whose address is not 256-byte aligned is copied into an aligned staging tensor
  at `run` time (TensorRT requires aligned I/O addresses), and empty tensors (P=0) are given a
  small valid buffer.
- `run` enqueues on the current torch CUDA stream (`execute_async_v3`) and synchronizes it, so
  it behaves like `OrtEngine.run` (outputs are ready when it returns).
- TensorRT 11 is strongly typed: the engine's I/O dtypes are the export's (fp16 K/V for an fp16
  export, int64 ids and masks, fp32 logits and scores); a mismatch is refused when binding.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from ..contract import ENGINE_DIR, ENGINE_INDEX, GraphVariant, input_names, output_names
from ..manifest import ExportMismatchError, Manifest
from .arrays import TorchArrays
from .engine import DTYPES

ALIGN = 256


def import_tensorrt():
    """`tensorrt`, or a clear error saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError("TensorRT is not installed: `pip install 'kvtrt[trt]'` (tensorrt>=10) on a machine with an "
                           f"NVIDIA GPU ({exc})") from None
    return trt


class TrtBinding:
    """The tensors one caller bound for one graph call."""

    def __init__(self, variant: GraphVariant | str):
        self.variant = variant
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}


class TrtEngine:
    """TensorRT engines for an export folder (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, manifest: Manifest | None = None, device_id: int = 0,
                 engine_dir: str | os.PathLike | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(directory)
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs an NVIDIA GPU with CUDA, and torch sees none; use "
                               "backend='onnxruntime' on this machine")
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = torch.device("cuda", device_id)
        self.device = f"cuda:{device_id}"
        self.dtype = DTYPES[self.manifest.kv_dtype]  # numpy dtype of K/V; the tensors are `self.arrays`'
        self.arrays = TorchArrays(self.device)
        engine_dir = Path(engine_dir) if engine_dir is not None else self.directory / ENGINE_DIR
        index = engine_dir / ENGINE_INDEX
        if not index.is_file():
            raise FileNotFoundError(f"no TensorRT engines in {engine_dir}; build them with "
                                    f"`kvtrt build-engine {self.directory}`")
        info = json.loads(index.read_text())
        built = (info.get("dtype"), info.get("kv_dtype", info.get("dtype")))  # engines before kv_dtype: the dtype's
        if built != (self.manifest.dtype, self.manifest.kv_dtype):
            raise ExportMismatchError(f"the engines in {engine_dir} were built for a {built[0]} export with a {built[1]} "
                                      f"KV cache, this export is {self.manifest.dtype} with {self.manifest.kv_dtype} KV; "
                                      f"rebuild with `kvtrt build-engine`")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines, self.contexts, self.locks = {}, {}, {}
        with torch.cuda.device(self.cuda):
            for variant in self.manifest.variant_graphs:
                path = engine_dir / info["engines"].get(variant, f"{variant}.engine")
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing; rebuild with `kvtrt build-engine {self.directory}`")
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise RuntimeError(f"TensorRT could not load {path} (built by TensorRT {info.get('tensorrt')}, "
                                       f"this is {trt.__version__}?); rebuild with `kvtrt build-engine`")
                self._check(variant, engine)
                self.engines[variant] = engine
                self.contexts[variant] = engine.create_execution_context()
                self.locks[variant] = threading.Lock()
        self._empty = torch.empty(ALIGN, dtype=torch.uint8, device=self.cuda)
        self._staging: dict[tuple, torch.Tensor] = {}

    def _check(self, variant: GraphVariant | str, engine) -> None:
        trt = self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = input_names(self.manifest.n_layers, variant) + output_names(self.manifest.n_layers, variant)
        if sorted(names) != sorted(want):
            raise ExportMismatchError(f"the {variant} engine's tensors do not match the manifest's "
                                      f"{self.manifest.n_layers} layers; rebuild with `kvtrt build-engine "
                                      f"{self.directory}`")
        for name in input_names(self.manifest.n_layers, variant):
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                raise ExportMismatchError(f"{variant} engine: {name} is not an input; rebuild the engine")

    # -- Engine protocol --------------------------------------------------------------------------
    def new_binding(self, variant: GraphVariant | str) -> TrtBinding:
        if variant not in self.engines:
            raise ValueError(f"graph {variant!r} is unknown; use one of {', '.join(self.engines)}")
        return TrtBinding(variant)

    def bind(self, binding: TrtBinding, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        engine = self.engines[binding.variant]
        for group, target in ((inputs, binding.inputs), (outputs, binding.outputs)):
            for name, tensor in group.items():
                if tensor.device != self.cuda:
                    raise ValueError(f"{name} is on {tensor.device}; the TensorRT engine needs tensors on "
                                     f"{self.cuda}")
                if not tensor.is_contiguous():
                    raise ValueError(f"bound tensors must be contiguous ({name} is not)")
                want = _torch_dtype(self.trt, engine.get_tensor_dtype(name))
                if tensor.dtype != want:
                    raise ValueError(f"{name} is {tensor.dtype} but the {binding.variant} engine expects {want} "
                                     f"(TensorRT is strongly typed: the export's dtype is the engine's)")
                target[name] = tensor

    def run(self, variant: GraphVariant | str, binding: TrtBinding, release_arena: bool = False) -> None:
        # (`release_arena` is ONNX Runtime's CPU arena shrinkage; TensorRT's activations are its own)
        engine, context = self.engines[variant], self.contexts[variant]
        stream = torch.cuda.current_stream(self.cuda)
        with self.locks[variant], torch.cuda.device(self.cuda):
            for name, tensor in binding.inputs.items():
                self._check_shape(variant, engine, name, tuple(tensor.shape))
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"TensorRT refused shape {tuple(tensor.shape)} for {variant} input {name}")
                context.set_tensor_address(name, self._address(name, tensor))
            for name, tensor in binding.outputs.items():
                expected = tuple(context.get_tensor_shape(name))
                if expected != tuple(tensor.shape):
                    raise ValueError(f"{variant} output {name} is bound as {tuple(tensor.shape)} but the engine "
                                     f"produces {expected} for these inputs")
                if tensor.numel() and tensor.data_ptr() % ALIGN:
                    raise ValueError(f"output {name} is not {ALIGN}-byte aligned; bind a freshly allocated tensor")
                context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._empty.data_ptr())
            missing = context.infer_shapes()
            if missing:
                raise ValueError(f"{variant} engine: no shape for {missing}; bind every input")
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run the {variant} engine")
            stream.synchronize()

    # -- helpers ----------------------------------------------------------------------------------
    def _address(self, name: str, tensor: torch.Tensor) -> int:
        if tensor.numel() == 0:
            return self._empty.data_ptr()
        if tensor.data_ptr() % ALIGN == 0:
            return tensor.data_ptr()
        key = (threading.get_ident(), name, tensor.dtype, tuple(tensor.shape))
        staging = self._staging.get(key)
        if staging is None:
            staging = self._staging[key] = torch.empty_like(tensor)
        staging.copy_(tensor)  # on the current stream, ordered before the engine call
        return staging.data_ptr()

    def _check_shape(self, variant: GraphVariant | str, engine, name: str, shape: tuple) -> None:
        lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            raise ValueError(f"{variant} input {name} has shape {shape}, outside the engine's profile {lo}..{hi}; "
                             f"rebuild with larger limits (`kvtrt build-engine --max-batch/--prefill-chunk/"
                             f"--capacity/--decode-view`) or use a smaller batch, chunk or KV view")


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise ValueError(f"TensorRT dtype {dtype} has no torch equivalent here")
    return table[dtype]


__all__ = ["TrtEngine", "TrtBinding", "import_tensorrt"]
