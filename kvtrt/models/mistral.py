"""Mistral family: Llama layout; a sliding window is honoured only when it covers the export."""

from __future__ import annotations

from .llama import LlamaAdapter, UnsupportedModelError


class MistralAdapter(LlamaAdapter):
    model_types = ("mistral",)

    def check(self, config, max_positions: int) -> None:
        super().check(config, max_positions)
        window = getattr(config, "sliding_window", None)
        if window is not None and window < max_positions:
            raise UnsupportedModelError(
                f"this Mistral model uses sliding-window attention ({window} tokens), which the kvtrt graph does "
                f"not implement; export with --max-positions {window} (or less) so full attention is exact")
