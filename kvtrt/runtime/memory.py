"""Returning freed memory to the OS."""

from __future__ import annotations

_MALLOC_TRIM = None


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`; elsewhere nothing). A prompt's
    per-layer K/V are a few MB each: once ONNX Runtime has raised glibc's dynamic mmap threshold
    they come from the heap, and freeing them would leave them resident without this."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
