"""RMSNorm: standard ops, and the residual add fused with it as ORT's SkipSimplifiedLayerNormalization."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) in fp32: the form ORT fuses into SimplifiedLayerNormalization
    (the rsqrt form is not fused)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(residual + x), residual + x) in standard ops: SkipSimplifiedLayerNormalization's fallback."""
    h = residual + x
    return rms_norm(h, weight, eps), h


class SkipSimplifiedLayerNormalization(torch.autograd.Function):
    """h = residual + x and RMSNorm(h) * weight in one node: ORT's
    `com.microsoft::SkipSimplifiedLayerNormalization` (CPU/CUDA; the in-place graphs, which are
    ORT-only anyway). Returns (normed, h). Standard ops (`add_rms_norm`) are an Add and the norm
    per residual: 60 more nodes a step for SmolLM2."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float):
        h = residual + x
        hf = h.float()
        return weight * (hf / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h

    @staticmethod
    def symbolic(g, x, residual, weight, eps: float):
        outs = g.op("kvtrt::SkipSimplifiedLayerNormalization", x, residual, weight, epsilon_f=eps, outputs=4)
        for out in outs:
            out.setType(x.type())
        return outs[0], outs[3]


def contrib_inputs(inputs: list[str]) -> list[str]:
    """The com.microsoft node's inputs from the placeholder's: the same."""
    return list(inputs)
