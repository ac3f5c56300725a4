"""The array operations of FreeKV / Quest retrieval, for numpy (the CPU) and torch (a GPU).

Retrieval (``pages.py``, ``views.py``, ``freekv.py``) is written once against the small namespace
below, named the numpy way. On the CPU it runs on numpy, so a process that serves FreeKV or Quest
never imports torch (whose import alone is ~190 MiB resident); on a CUDA device the same code runs
on torch tensors (``TorchBackend``, also usable on the CPU, which is how the tests run the GPU
code path here). ``backend_for(device)`` picks one.

Inputs handed to a manager may be either kind on the CPU: ``asarray`` converts without a copy.
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from ..arrays import NumpyArrays

#: values from which a float16 cast goes through ONNX Runtime (below, a call costs more than numpy's cast)
ORT_CAST_MIN = 1 << 14


class NumpyBackend:
    """numpy arrays on the host. Large buffers are anonymous maps (``arrays.NumpyArrays``): their
    pages are resident once written and go back to the OS when the last view is dropped."""

    name = "numpy"
    device = "cpu"
    is_cuda = False
    float32, float16, uint8, int64, bool = np.float32, np.float16, np.uint8, np.int64, np.bool_
    _alloc = NumpyArrays()

    # ------------------------------------------------------------------ making arrays
    def dtype(self, dtype) -> np.dtype:
        """The numpy dtype of a numpy dtype, a dtype name or a torch dtype."""
        if isinstance(dtype, (str, type, np.dtype)):
            return np.dtype({"bool": np.bool_}.get(dtype, dtype) if isinstance(dtype, str) else dtype)
        return np.dtype(str(dtype).removeprefix("torch."))  # a torch dtype, named the same way

    def empty(self, shape, dtype, pin_memory: bool = False) -> np.ndarray:
        """Zero-filled, at no cost: a large buffer is a map (zero until written, resident once
        written), a small one is filled (so never-written entries are never garbage)."""
        return self._alloc.zeros(tuple(shape), self.dtype(dtype))

    def zeros(self, shape, dtype) -> np.ndarray:
        return self._alloc.zeros(tuple(shape), self.dtype(dtype))

    def full(self, shape, value, dtype) -> np.ndarray:
        return np.full(tuple(shape), value, dtype=self.dtype(dtype))

    def arange(self, start: int, stop: int | None = None) -> np.ndarray:
        return np.arange(start, stop, dtype=np.int64) if stop is not None else np.arange(start, dtype=np.int64)

    def asarray(self, x, dtype=None) -> np.ndarray:
        """``x`` (numpy, a CPU torch tensor, a list) as an array here, without a copy when possible."""
        if hasattr(x, "detach"):
            x = x.detach().numpy()
        return np.asarray(x, dtype=None if dtype is None else self.dtype(dtype))

    def astype(self, x, dtype) -> np.ndarray:
        return x.astype(self.dtype(dtype), copy=False)

    def clone(self, x) -> np.ndarray:
        return np.array(x, copy=True)

    def stack(self, arrays, axis: int = 0) -> np.ndarray:
        return np.stack(arrays, axis=axis)

    def is_array(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def reshape_view(self, x, shape) -> np.ndarray:
        """``x`` reshaped without a copy (an error if that would need one)."""
        view = x.view()
        view.shape = shape  # (numpy < 2.1 has no reshape(copy=False); this raises the same way)
        return view

    def scratch(self, shape, dtype) -> np.ndarray:
        """A short-lived buffer, uninitialized (no memory map: it is made and dropped per call)."""
        return np.empty(tuple(shape), dtype=self.dtype(dtype))

    # ------------------------------------------------------------------ maths
    def amin(self, x, axis, keepdims: bool = False):
        return _reduce(np.minimum, x, axis, keepdims)

    def amax(self, x, axis, keepdims: bool = False):
        return _reduce(np.maximum, x, axis, keepdims)

    def swapaxes(self, x, a: int, b: int):
        return np.swapaxes(x, a, b)

    def clamp(self, x, lo=None, hi=None):
        return np.clip(x, lo, hi)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def softmax(self, x, axis: int = -1):
        """Softmax along ``axis``; a slice that is all ``-inf`` comes out NaN (as torch's does)."""
        with np.errstate(invalid="ignore"):
            e = np.exp(x - x.max(axis=axis, keepdims=True))
            return e / e.sum(axis=axis, keepdims=True)

    def nan_to_num(self, x):
        return np.nan_to_num(x, nan=0.0, posinf=np.inf, neginf=-np.inf)

    def isneginf(self, x):
        return np.isneginf(x)

    def rint(self, x):
        return np.rint(x)

    def topk(self, x, k: int):
        """The ``k`` largest values along the last axis and their indices, largest first, ties to
        the lowest index (as ``TorchBackend.topk``)."""
        index = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, index, -1), index

    def argsort_stable(self, x, axis: int = -1):
        return np.argsort(x, axis=axis, kind="stable")

    def take(self, x, index, axis: int = 0):
        return np.take(x, index, axis=axis)

    def take_along(self, x, index, axis: int):
        return np.take_along_axis(x, index, axis)

    def cast(self, x, dtype):
        """``x`` in ``dtype``; float32 to float16 by ONNX Runtime (``host_gather.py``), bit for bit."""
        dtype = self.dtype(dtype)
        if x.dtype == np.float32 and dtype == np.float16 and x.size >= ORT_CAST_MIN:
            from .host_gather import narrowed

            return narrowed(x)
        return x.astype(dtype, copy=False)

    def take_rows(self, x, rows, dtype):
        """``x[rows]`` (along axis 0) in ``dtype``; float16 rows widened to float32 by ONNX Runtime
        (``host_gather.py``: numpy's float16 cast is ~25x slower)."""
        dtype = self.dtype(dtype)
        if x.dtype == np.float16 and dtype == np.float32 and len(rows) * x[0].size >= ORT_CAST_MIN:
            from .host_gather import gather_widened

            return gather_widened(x, rows)
        return np.take(x, rows, axis=0).astype(dtype, copy=False)

    def nonzero(self, x) -> tuple:
        return np.nonzero(x)

    def searchsorted(self, a, v):
        return np.searchsorted(a, v)

    def repeat(self, x, count: int, axis: int):
        return np.repeat(x, count, axis=axis)

    def cosine(self, a, b, eps: float = 1e-8):
        """Cosine similarity along the last axis as torch computes it: each vector divided by its
        norm (clamped to ``eps``), then their dot product."""
        a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), eps)
        return (a * b).sum(axis=-1)

    def addcmul(self, lo, q, step, out) -> None:
        """``out = lo + q * step`` (``q`` uint8 codes)."""
        np.multiply(q, step, out=out)
        out += lo

    # ------------------------------------------------------------------ sizes, devices, threads
    def size(self, x) -> int:
        return int(x.size)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def to_host(self, x):
        return x

    def copy_into(self, dst, src: np.ndarray, non_blocking: bool = False) -> None:
        """Write the host array ``src`` into ``dst`` (cast to its dtype)."""
        dst[...] = src

    def to_device(self, x, dtype=None):
        return x if dtype is None else x.astype(self.dtype(dtype), copy=False)

    def inference(self):
        return contextlib.nullcontext()

    def thread_setup(self):
        """``(initializer, args)`` for a worker thread: nothing to carry over for numpy."""
        return None, ()

    def weak_buffers(self, arrays) -> list[tuple[object, int]]:
        """A weak reference and the size of each distinct buffer under ``arrays`` (the memory map or
        array that owns the bytes)."""
        seen: dict[int, tuple[object, int]] = {}
        for x in arrays:
            if x is None:
                continue
            owner = _owner(x)
            if hasattr(owner, "untyped_storage"):  # a CPU torch tensor handed over (torch is imported)
                seen.update({key: value for key, value in TorchBackend.storage_refs([owner]).items()
                             if key not in seen})
            elif id(owner) not in seen:
                try:
                    ref = weakref.ref(owner)
                except TypeError:  # bytes and the like: follow the outermost array that views them
                    owner = _owner(x, arrays_only=True)
                    ref = weakref.ref(owner)
                size = owner.nbytes if isinstance(owner, np.ndarray) else memoryview(owner).nbytes
                seen[id(owner)] = (ref, size)
        return list(seen.values())


def _reduce(ufunc, x: np.ndarray, axis, keepdims: bool):
    """``ufunc.reduce`` over ``axis``; over one axis that is not the last, as a loop of whole-slice
    ufunc calls (4x faster than numpy's reduce there: each call runs over the contiguous rest)."""
    if keepdims or not isinstance(axis, int) or axis % x.ndim == x.ndim - 1 or x.shape[axis] < 2:
        return ufunc.reduce(x, axis=axis, keepdims=keepdims)
    x = np.moveaxis(x, axis, 0)
    out = x[0].copy()
    for part in x[1:]:
        ufunc(out, part, out=out)
    return out


def _owner(x: np.ndarray, arrays_only: bool = False):
    """What owns an array's bytes: the innermost base (a memory map, bytes, a torch tensor, or an
    array); with ``arrays_only``, the innermost array."""
    while True:
        base = x.base
        if base is None or (arrays_only and not isinstance(base, np.ndarray)):
            return x
        if isinstance(base, memoryview):
            return base.obj
        if not isinstance(base, np.ndarray):
            return base
        x = base


class TorchBackend:
    """torch tensors on ``device`` (a CUDA device; on "cpu" the tests run the GPU code path)."""

    name = "torch"

    def __init__(self, device="cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.float32, self.float16, self.uint8 = torch.float32, torch.float16, torch.uint8
        self.int64, self.bool = torch.int64, torch.bool

    def dtype(self, dtype):
        """The torch dtype of a torch dtype, a numpy dtype or a dtype name."""
        if isinstance(dtype, self.torch.dtype):
            return dtype
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        return getattr(self.torch, {"bool_": "bool"}.get(name, name))

    def empty(self, shape, dtype, pin_memory: bool = False):
        if pin_memory:
            return self.torch.empty(tuple(shape), dtype=self.dtype(dtype), pin_memory=True)
        return self.torch.empty(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    def zeros(self, shape, dtype):
        return self.torch.zeros(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    def full(self, shape, value, dtype):
        return self.torch.full(tuple(shape), value, dtype=self.dtype(dtype), device=self.device)

    def arange(self, start: int, stop: int | None = None):
        if stop is None:
            start, stop = 0, start
        return self.torch.arange(start, stop, device=self.device)

    def asarray(self, x, dtype=None):
        return self.torch.as_tensor(x, dtype=None if dtype is None else self.dtype(dtype), device=self.device)

    def astype(self, x, dtype):
        return x.to(self.dtype(dtype))

    def clone(self, x):
        return x.clone()

    def stack(self, arrays, axis: int = 0):
        return self.torch.stack(list(arrays), dim=axis)

    def is_array(self, x) -> bool:
        return isinstance(x, self.torch.Tensor)

    def reshape_view(self, x, shape):
        return x.view(shape)

    def scratch(self, shape, dtype):
        return self.empty(shape, dtype)

    def amin(self, x, axis, keepdims: bool = False):
        return x.amin(dim=axis, keepdim=keepdims)

    def amax(self, x, axis, keepdims: bool = False):
        return x.amax(dim=axis, keepdim=keepdims)

    def swapaxes(self, x, a: int, b: int):
        return x.transpose(a, b)

    def clamp(self, x, lo=None, hi=None):
        return x.clamp(min=lo, max=hi)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)  # (a Python scalar stays a scalar: no host-to-device copy)

    def softmax(self, x, axis: int = -1):
        return self.torch.softmax(x, dim=axis)

    def nan_to_num(self, x):
        return x.nan_to_num(0.0, posinf=float("inf"), neginf=float("-inf"))

    def isneginf(self, x):
        return self.torch.isneginf(x)

    def rint(self, x):
        return x.round()

    def topk(self, x, k: int):
        """The ``k`` largest along the last dim, largest first, ties to the lowest index (a stable
        sort: ``torch.topk``'s tie order is unspecified)."""
        values, index = self.torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], index[..., :k]

    def argsort_stable(self, x, axis: int = -1):
        return self.torch.argsort(x, dim=axis, stable=True)

    def take(self, x, index, axis: int = 0):
        return x.index_select(axis, index)

    def take_along(self, x, index, axis: int):
        return self.torch.gather(x, axis, index)

    def cast(self, x, dtype):
        return x.to(self.dtype(dtype))

    def take_rows(self, x, rows, dtype):
        return x.index_select(0, rows).to(self.dtype(dtype))

    def nonzero(self, x) -> tuple:
        return self.torch.nonzero(x, as_tuple=True)

    def searchsorted(self, a, v):
        return self.torch.searchsorted(a, v)

    def repeat(self, x, count: int, axis: int):
        return x.repeat_interleave(count, dim=axis)

    def cosine(self, a, b, eps: float = 1e-8):
        return self.torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=eps)

    def addcmul(self, lo, q, step, out) -> None:
        self.torch.addcmul(lo, q, step, out=out)

    def size(self, x) -> int:
        return int(x.numel())

    def nbytes(self, x) -> int:
        return int(x.numel() * x.element_size())

    def to_host(self, x):
        return x.cpu()

    def copy_into(self, dst, src: np.ndarray, non_blocking: bool = False) -> None:
        dst.copy_(self.torch.from_numpy(src).to(dst.dtype), non_blocking=non_blocking)

    def to_device(self, x, dtype=None):
        return x.to(device=self.device, dtype=None if dtype is None else self.dtype(dtype))

    def inference(self):
        """Only temporaries are made under it: skips autograd's bookkeeping on small ops."""
        return self.torch.inference_mode()

    def thread_setup(self):
        """A worker thread keeps the caller's torch thread count."""
        return self.torch.set_num_threads, (self.torch.get_num_threads(),)

    def weak_buffers(self, tensors) -> list[tuple[object, int]]:
        """A weak reference (called: None once freed) and the size of each distinct storage."""
        return list(self.storage_refs(tensors).values())

    @staticmethod
    def storage_refs(tensors) -> dict[int, tuple[object, int]]:
        from torch.multiprocessing.reductions import StorageWeakRef

        seen: dict[int, tuple[object, int]] = {}
        for t in tensors:
            if t is not None:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                seen.setdefault(storage.data_ptr(), (lambda ref=ref: None if ref.expired() else ref,
                                                     storage.nbytes()))
        return seen


_NUMPY = NumpyBackend()  # backends hold no state: one per device, made once (selection calls
_TORCH: dict[str, TorchBackend] = {}  # `backend_of` a few times per decode step)


def backend_for(device="cpu"):
    """numpy on the CPU, torch on any other device (``device``: a name or a torch device)."""
    return _NUMPY if str(device) == "cpu" else _torch_backend(device)


def backend_of(x):
    """The backend of an array: numpy for a numpy array, torch (on its device) for a tensor."""
    return _NUMPY if isinstance(x, np.ndarray) else _torch_backend(x.device)


def _torch_backend(device) -> TorchBackend:
    if str(device) not in _TORCH:
        _TORCH[str(device)] = TorchBackend(device)
    return _TORCH[str(device)]
