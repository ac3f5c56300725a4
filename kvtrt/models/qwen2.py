"""Qwen2 family: Llama layout with q/k/v biases."""

from __future__ import annotations

from .llama import LlamaAdapter, UnsupportedModelError


class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2",)
    qkv_bias = True

    def check(self, config, max_positions: int) -> None:
        super().check(config, max_positions)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", False) and window is not None and window < max_positions:
            raise UnsupportedModelError(
                f"use_sliding_window=True with a {window}-token window is not implemented; "
                f"export with --max-positions {window} (or less)")
