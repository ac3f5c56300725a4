"""torch for the GPU-only modules (`kv/cuda_copy.py`), imported when first used.

On the CPU nothing imports torch (~190 MiB and ~1.3 s per process): the dense path, retrieval and the
compaction policies are numpy. Modules write `from ..lazy_torch import torch` and use `torch.x` as usual.
"""

from __future__ import annotations

import importlib


class LazyModule:
    """A module imported on the first attribute read; each attribute is then cached on this object."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        value = getattr(importlib.import_module(self._name), attr)
        self.__dict__[attr] = value
        return value


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")
