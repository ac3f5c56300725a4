"""One adapter per architecture family, picked by `config.model_type`."""

from __future__ import annotations

from .base import ArchConfig, DecoderGraph
from .llama import LlamaAdapter, UnsupportedModelError
from .mistral import MistralAdapter
from .qwen2 import Qwen2Adapter

ADAPTERS: dict[str, LlamaAdapter] = {t: a for a in (LlamaAdapter(), MistralAdapter(), Qwen2Adapter())
                                     for t in a.model_types}


def get_adapter(model_type: str) -> LlamaAdapter:
    """The adapter for `model_type`, or a clear error listing the supported families."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; kvtrt exports {', '.join(sorted(ADAPTERS))} "
            f"(Llama-family decoders). Add an adapter in kvtrt/models/ for other families.") from None


__all__ = ["ADAPTERS", "ArchConfig", "DecoderGraph", "UnsupportedModelError", "get_adapter"]
