"""torch for the KV manager's policies and retrieval, imported when first used.

`import kvtrt`, `kvtrt.load` and a dense (full-cache) request never touch torch; the first
compaction or retrieval request does (~190 MiB and ~1.3 s, once per process). Modules write
`from ..lazy_torch import torch` and use `torch.x` as usual.
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
