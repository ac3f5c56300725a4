"""Small helpers the plugins share: fp32 outputs, grouped bias rows, ONNX constants."""

from __future__ import annotations

import torch
from torch import Tensor

_SCALAR_DTYPES = {"Float": torch.float32, "Half": torch.float16}


def fp32(x: Tensor) -> Tensor:
    """x as float32; no node at all when it already is (the exporter would emit a Cast copy)."""
    return x if x.dtype == torch.float32 else x.float()


def tile_group(bias: Tensor, group: int) -> Tensor:
    """[B,1,S,T] -> [B,1,group*S,T]: the rows of every query head of a KV group, head-major."""
    return bias.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(2, 3)


def const(g, value, dtype=torch.long):
    """An ONNX Constant node inside a symbolic function."""
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def zero_and_neg_inf(g, like):
    """Scalar 0 and -inf Constant nodes of `like`'s float dtype."""
    dtype = _SCALAR_DTYPES[like.type().scalarType()]
    return (g.op("Constant", value_t=torch.zeros((), dtype=dtype)),
            g.op("Constant", value_t=torch.full((), float("-inf"), dtype=dtype)))
