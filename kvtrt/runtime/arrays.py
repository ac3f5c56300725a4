"""The arrays an engine binds: numpy on the CPU, torch tensors on a GPU.

The dense KV path (store, decode batch, prefill, output buffers, sampling) is written once against
the few operations below, so a CPU runtime never imports torch (torch's import alone is ~190 MiB of
resident memory and ~1.3 s): the compaction policies compute in numpy on the host (`kv/policies.py`)
and the retrieval managers (FreeKV, Quest) on the backend of the engine's device (`kv/backend.py`).

Large CPU buffers are anonymous memory maps: pages become resident when written (rows never touched
cost nothing), read as zeros before that, and go back to the OS the moment the last view of the
buffer is dropped. (numpy's own allocator would put arrays of 4 MiB and more in transparent huge
pages, resident 2 MiB at a time.)
"""

from __future__ import annotations

import mmap

import numpy as np

MAPPED_BYTES = 1 << 20  # buffers at least this large are memory maps (below: numpy's allocator)
#: the dtypes engines bind, each with the name of its torch counterpart
TORCH_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int64): "int64",
               np.dtype(np.int32): "int32", np.dtype(np.bool_): "bool"}


def _mapped(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    # private: a forked child gets copy-on-write pages, not the parent's KV (Python's default is MAP_SHARED)
    buffer = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class NumpyArrays:
    """Host arrays (the CPU execution provider)."""

    device = "cpu"

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """Uninitialized for small buffers; large ones are maps, zero until written."""
        return self._allocate(tuple(shape), dtype, np.empty)

    def zeros(self, shape, dtype=np.float32) -> np.ndarray:
        return self._allocate(tuple(shape), dtype, np.zeros)

    @staticmethod
    def _allocate(shape: tuple[int, ...], dtype, small) -> np.ndarray:
        if np.prod(shape, dtype=np.int64) * np.dtype(dtype).itemsize >= MAPPED_BYTES:
            return _mapped(shape, dtype)
        return small(shape, dtype)

    def asarray(self, values, dtype=np.int64) -> np.ndarray:
        out = np.asarray(values, dtype=dtype)  # (a scalar stays 0-d)
        return out if out.flags.c_contiguous else out.copy()

    def arange(self, start: int, stop: int | None = None) -> np.ndarray:
        return np.arange(start, stop, dtype=np.int64) if stop is not None else np.arange(start, dtype=np.int64)

    def take_along(self, x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
        return np.take_along_axis(x, index, axis)

    def repeat(self, x: np.ndarray, count: int, axis: int) -> np.ndarray:
        return np.repeat(x, count, axis)

    def copy(self, x: np.ndarray) -> np.ndarray:
        out = self.empty(x.shape, x.dtype)
        out[...] = x
        return out

    def nonzero(self, x: np.ndarray) -> np.ndarray:
        """Indices of the non-zero entries of a 1-D array."""
        return np.flatnonzero(x)


class TorchArrays:
    """torch tensors on `device` (GPU engines; on "cpu" the tests use it to run the GPU code path)."""

    def __init__(self, device: str = "cpu"):
        try:
            import torch
        except ImportError:
            raise RuntimeError(f"a GPU engine keeps its KV cache in torch tensors on {device}, and torch is not "
                               f"installed; install it with `pip install 'kvtrt[gpu]'` (or 'kvtrt[trt]')") from None

        self.torch, self.device = torch, torch.device(device)
        self._dtypes = {dtype: getattr(torch, name) for dtype, name in TORCH_NAMES.items()}

    def dtype(self, dtype):
        """The torch dtype of a numpy dtype (a torch dtype is returned as is)."""
        return dtype if isinstance(dtype, self.torch.dtype) else self._dtypes[np.dtype(dtype)]

    def empty(self, shape, dtype=np.float32):
        return self.torch.empty(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    def zeros(self, shape, dtype=np.float32):
        return self.torch.zeros(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    def asarray(self, values, dtype=np.int64):
        return self.torch.as_tensor(values, dtype=self.dtype(dtype), device=self.device)

    def arange(self, start: int, stop: int | None = None):
        if stop is None:
            start, stop = 0, start
        return self.torch.arange(start, stop, device=self.device)

    def take_along(self, x, index, axis: int):
        return self.torch.take_along_dim(x, index, axis)

    def repeat(self, x, count: int, axis: int):
        return x.repeat_interleave(count, dim=axis)

    def copy(self, x):
        return x.clone()

    def nonzero(self, x):
        return self.torch.nonzero(x, as_tuple=True)[0]


def for_provider(provider: str, device_id: int = 0):
    """`NumpyArrays` for the CPU provider, `TorchArrays` on the GPU for the others."""
    return NumpyArrays() if provider == "cpu" else TorchArrays(f"cuda:{device_id}")


def host(x) -> np.ndarray:
    """A numpy view (CPU) or copy (GPU) of an engine array: numpy arrays pass through, torch tensors
    are detached and moved to the host."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor; torch is only touched when one is passed
        return x.detach().cpu().numpy()
    return np.asarray(x)
