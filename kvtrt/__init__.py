"""kvtrt: ONNX/TensorRT deployment of long-context LLMs with KVCrush compaction and FreeKV retrieval.

    import kvtrt
    llm = kvtrt.load("smollm2-export")
    print(llm.generate("Hello").text)
"""

__version__ = "0.1.0"

from .runtime.llm import LLM, GenerationResult, PromptTooLongError, load  # noqa: E402
from .runtime.request import KVMemoryError, QueueFullError, Request  # noqa: E402

__all__ = ["LLM", "GenerationResult", "KVMemoryError", "PromptTooLongError", "QueueFullError", "Request", "load",
           "__version__"]
