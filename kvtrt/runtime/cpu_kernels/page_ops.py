"""FreeKV's page selection and recall on the host, in C (`page_ops.c`, called through ctypes).

A FreeKV step on the CPU re-selects the pages of the heads whose query moved and recalls the missing
ones: with numpy and ONNX Runtime graphs that is ~10 calls and ~4 ms a step at 7680 tokens on SmolLM2,
mostly per-call overhead (`docs/results/freekv_profile.md`). Here each is one C call.

    select(query, kmin, kmax, n_pages, k, combine, only=None, threads=1)   # [R, B, Hkv, k], -1 padded
    recall(slot_pages, selected, pool_data, view_kv, layer0, sink, counts, threads=1)

Same results as `pages.select_pages` (float32; the sums' order may differ in the last bit, which can
swap two pages whose scores tie to within it) and as `freekv._placement` + `KVView.put_pages` (exact:
a copy, or float16 widened). `available()` is False where the library cannot be built (no C compiler;
`cpu_kernels.unavailable()` says why) or `KVTRT_PAGE_OPS=0`: callers then take the numpy path, which
computes the same.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading

import numpy as np

from . import library

_lock = threading.Lock()
_lib: list = []  # [ctypes.CDLL or None], once loaded
_P = ctypes.c_void_p
_I = ctypes.c_int64


def available() -> bool:
    """Whether the C page ops run here (built, and not turned off by `KVTRT_PAGE_OPS=0`)."""
    if os.environ.get("KVTRT_PAGE_OPS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _library() is not None


def _library():
    with _lock:
        if not _lib:
            path = library("page_ops")
            lib = None if path is None else ctypes.CDLL(str(path))
            if lib is not None:
                lib.kvtrt_select_pages.argtypes = [_I] * 6 + [_P] * 4 + [_I, ctypes.c_int, ctypes.c_float, _P, _P,
                                                  ctypes.c_int]
                lib.kvtrt_select_pages.restype = ctypes.c_int
                lib.kvtrt_recall_pages.argtypes = [_I] * 6 + [_P, _P, _P, ctypes.c_int, _I, _P, ctypes.c_int] + \
                    [_I] * 4 + [_P, ctypes.c_int]
                lib.kvtrt_recall_pages.restype = ctypes.c_int
                lib.kvtrt_cover_test.argtypes = [_P, _I, _P, _P]
                lib.kvtrt_cover_test.restype = ctypes.c_int
            _lib.append(lib)
        return _lib[0]


def _ptr(a: np.ndarray) -> int:
    if not a.flags.c_contiguous:
        raise ValueError("page ops need C-contiguous arrays")
    return a.ctypes.data


def select(query: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, n_pages, k: int, combine: str = "softmax",
           only: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Top-``k`` page ids per (sequence, KV head), int64 ``[..., B, Hkv, k]`` (-1 padded).

    ``query`` ``[..., B, H, D]``; ``kmin``/``kmax`` ``[..., B, Hkv, C, D]`` float16 (all ``C`` allocated
    pages; those past ``n_pages[b]`` are never chosen); ``n_pages`` ``[B]``. ``only`` ``[..., B, Hkv]``
    bool: select these rows, the others come back all -1. ``threads``: rows split over that many threads
    (1 beside a running decode graph; more where the step waits for the selection)."""
    if combine not in ("softmax", "mean"):
        raise ValueError(f"combine={combine!r}; use softmax or mean")
    *lead, batch, heads, dim = query.shape
    hkv, cap = kmin.shape[-3], kmin.shape[-2]
    rows = math.prod(lead) * batch * hkv
    q = np.ascontiguousarray(query, dtype=np.float32)
    if kmin.dtype != np.float16 or kmax.dtype != np.float16:
        raise ValueError(f"page summaries are float16 on the host (`PagePool`), got {kmin.dtype} / {kmax.dtype}; "
                         f"round float32 ones outward with `pages.outward_fp16`")
    kmin, kmax = np.ascontiguousarray(kmin), np.ascontiguousarray(kmax)
    n = np.ascontiguousarray(np.asarray(n_pages, dtype=np.int64).reshape(batch))
    out = np.full((*lead, batch, hkv, k), -1, np.int64)
    mask = None if only is None else np.ascontiguousarray(only, dtype=np.uint8)
    if k and rows:
        code = _library().kvtrt_select_pages(rows, batch, hkv, heads // hkv, dim, cap, _ptr(q), _ptr(kmin),
                                             _ptr(kmax), _ptr(n), k, combine == "softmax", 1.0 / math.sqrt(dim),
                                             None if mask is None else _ptr(mask), _ptr(out), threads)
        if code:
            raise MemoryError("kvtrt_select_pages could not allocate its scores")
    return out


def recall(slot_pages: np.ndarray, selected: np.ndarray, pool_data: np.ndarray, view_kv: np.ndarray,
           layer0: int, sink: int, counts: np.ndarray, threads: int = 1) -> None:
    """Make the page slots of ``slot_pages`` ``[Lg, B, Hkv, k]`` (layers ``layer0 ..``; updated in place)
    hold ``selected`` (same shape, -1 = none): held pages stay in their slot, missing ones go to the free
    slots in ascending order and are copied from ``pool_data`` ``[L, B, cap, Hkv, 2, page, D]`` (float32
    or float16) into ``view_kv`` ``[2, L, B, Hkv, width, D]`` (float32, or float16 from a float16 pool).
    ``counts`` int64 ``[3]`` += pages selected, already held, copied. ``threads`` as in ``select``."""
    lg, batch, hkv, k = slot_pages.shape
    layers, _, cap, _, _, page, dim = pool_data.shape
    if view_kv.dtype == np.float16 and pool_data.dtype != np.float16:
        raise ValueError("a float16 view is recalled from a float16 pool only")
    selected = np.ascontiguousarray(selected, dtype=np.int64)
    code = _library().kvtrt_recall_pages(lg * batch * hkv, layer0, layers, batch, hkv, k, _ptr(slot_pages),
                                         _ptr(selected), _ptr(pool_data), pool_data.dtype == np.float16, cap,
                                         _ptr(view_kv), view_kv.dtype == np.float16, view_kv.shape[-2], sink, page, dim,
                                         _ptr(counts), threads)
    if code:
        raise MemoryError("kvtrt_recall_pages could not allocate its placement")


# --- the inline refresh: FreeKV's correction inside the decode attention op (`page_ops.c`, end) ---

class InlineView(ctypes.Structure):
    """What the decode attention op's refresh reads of one retrieval view (``InlineView`` in
    ``page_ops.c``; the same fields in the same order). Filled by ``FreeKVRetrieval.inline_refresh``."""

    _fields_ = [(name, _P) for name in ("view", "pool", "kmin", "kmax", "slot_pages", "basis", "counts", "smin",
                                        "smax")] + \
        [(name, _I) for name in ("layers", "kv_heads", "group", "dim", "width", "sink", "page", "k", "cap", "n_pages",
                                 "view_half", "pool_half", "every", "drift_min", "softmax", "cover", "span", "scap")] + \
        [("tau", ctypes.c_float)]


_hooked: set[str] = set()


def install_refresh_hook(decode_library) -> bool:
    """Point the decode attention library at ``decode_library`` (the one ONNX Runtime loaded:
    ``cpu_kernels.library()``) to this library's ``kvtrt_refresh_layer``, once. False if the page ops
    are not available (then no retrieval view can be refreshed inline)."""
    lib = _library() if available() else None
    if lib is None or decode_library is None:
        return False
    with _lock:
        if str(decode_library) not in _hooked:
            decode = ctypes.CDLL(str(decode_library))  # the same handle as ONNX Runtime's (dlopen of one path)
            decode.kvtrt_set_refresh_hook.argtypes = [_P]
            decode.kvtrt_set_refresh_hook(ctypes.cast(lib.kvtrt_refresh_layer, _P).value)
            _hooked.add(str(decode_library))
    return True


def cover_test(view: InlineView, layer: int, query: np.ndarray) -> np.ndarray:
    """``[Hkv]`` bool: the KV heads of ``layer`` whose query heads' (``query`` ``[H, D]`` float32) ``cover`` best
    pages, searched over the ``cover`` best spans, are not all held (``view.slot_pages``): FreeKV's cover test
    as the inline refresh runs it (``page_ops.c``, ``cover_item``)."""
    query = np.ascontiguousarray(query, np.float32)
    missed = np.zeros(view.kv_heads, np.uint8)
    if _library().kvtrt_cover_test(ctypes.byref(view), layer, _ptr(query), _ptr(missed)):
        raise MemoryError("kvtrt_cover_test could not allocate its scratch")
    return missed.astype(bool)


def arm(view: InlineView) -> None:
    """Make the decode attention op refresh ``view``'s layers before it attends them."""
    if _library().kvtrt_arm_view(ctypes.byref(view)):
        raise RuntimeError("more than 64 retrieval views armed at once for the inline refresh")


def disarm(view: InlineView) -> None:
    _library().kvtrt_disarm_view(ctypes.byref(view))
