"""onnxruntime-genai as a peer: its model built from the export's source, loaded, and scored.

`kvtrt bench --peer ortgenai` and `kvtrt eval --peer ortgenai` use these; they need the bench
extra (`pip install 'kvtrt[bench]'`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PEERS = ("ortgenai",)
PEER_PRECISIONS = ("fp32", "int4")


def ortgenai_model(model_dir: str, threads: int | None):
    """The onnxruntime-genai model in `model_dir` with `threads` intra-op threads (None: its default)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise RuntimeError("the onnxruntime-genai peer needs `pip install 'kvtrt[bench]'`") from None
    config = og.Config(str(model_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def ortgenai_nll(model, prompt: list[int], targets: list[int]) -> float:
    """Teacher-forced negative log-likelihood (nats, summed) of `targets` after `prompt` under the
    onnxruntime-genai `model`: its own KV cache and graphs, the logits of each step scored in float64."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(targets), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    nll = 0.0
    for i, target in enumerate(targets):
        logits = generator.get_logits()[0, -1].astype(np.float64)
        top = logits.max()
        nll += top + math.log(np.exp(logits - top).sum()) - logits[target]
        if i + 1 < len(targets):
            generator.append_tokens([target])
    return nll


def peer_directory(directory: str, peer_dir: str | None, precision: str) -> str:
    """Where the peer model of export `directory` is cached: `peer_dir`, or DIR-ortgenai-PRECISION beside it."""
    return peer_dir or str(Path(directory).resolve().parent / f"{Path(directory).name}-ortgenai-{precision}")


def build_ortgenai(directory: str, out: Path, precision: str = "fp32", hf=None) -> Path:
    """Build (once, cached in `out`) an onnxruntime-genai model from the export's source model
    (or from `hf`, an in-memory (model, tokenizer) pair)."""
    if (out / "genai_config.json").is_file():
        return out
    from ..manifest import Manifest
    from ..models.loading import load_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_plain_hf(*(hf or load_hf(Manifest.load(directory).source)), Path(tmp))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", tmp, "-o", str(out), "-p", precision,
               "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        print("building onnxruntime-genai peer:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def save_plain_hf(model, tokenizer, folder: Path) -> None:
    """A plain safetensors HF folder (transformers refuses save_pretrained for GGUF-loaded models)."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))


# -- OpenVINO GenAI (`kvtrt bench-serve --peer openvino`) ----------------------------------------------
#: the OpenVINO GenAI CPU block: cache-eviction sizes are whole blocks of this many tokens
OPENVINO_BLOCK = 32
OPTIMUM_CLI_ENV = "KVTRT_OPTIMUM_CLI"


def openvino_directory(directory: str, peer_dir: str | None) -> str:
    """Where the OpenVINO model of export `directory` is cached: `peer_dir`, or DIR-openvino-fp32 beside it."""
    return peer_dir or str(Path(directory).resolve().parent / f"{Path(directory).name}-openvino-fp32")


def optimum_cli() -> str:
    """The `optimum-cli` to convert with: $KVTRT_OPTIMUM_CLI, else the one on PATH. optimum-intel pins
    its own transformers/torch, so it may live in a separate virtualenv (point the variable at its
    bin/optimum-cli)."""
    import os
    import shutil

    found = os.environ.get(OPTIMUM_CLI_ENV) or shutil.which("optimum-cli")
    if not found:
        raise RuntimeError(
            "the OpenVINO peer converts the model once with optimum-intel's `optimum-cli`, which is not installed; "
            "`pip install optimum-intel` (it pins its own transformers and torch: a separate virtualenv works, e.g. "
            "`python -m venv --system-site-packages ~/.cache/kvtrt/peers/optimum-venv && "
            "~/.cache/kvtrt/peers/optimum-venv/bin/pip install optimum-intel`), then set "
            f"{OPTIMUM_CLI_ENV}=~/.cache/kvtrt/peers/optimum-venv/bin/optimum-cli")
    return found


def build_openvino(directory: str, out: Path, hf=None) -> Path:
    """Convert (once, cached in `out`) the export's source model to OpenVINO IR with fp32 weights
    (`optimum-cli export openvino --task text-generation-with-past --weight-format fp32`), plus an
    OpenVINO tokenizer/detokenizer made from the export's own tokenizer.json (the peer is fed the
    same token ids; its pipeline still loads a tokenizer). `hf`: an in-memory (model, tokenizer)."""
    out = Path(out)
    if (out / "openvino_model.xml").is_file() and (out / "openvino_tokenizer.xml").is_file():
        return out
    import shutil

    from ..manifest import Manifest
    from ..models.loading import load_hf

    manifest = Manifest.load(directory)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, tok_dir = Path(tmp) / "hf", Path(tmp) / "tok"
        hf_dir.mkdir()
        tok_dir.mkdir()
        save_plain_hf(*(hf or load_hf(manifest.source)), hf_dir)
        cmd = [optimum_cli(), "export", "openvino", "--model", str(hf_dir), "--task", "text-generation-with-past",
               "--weight-format", "fp32", str(out)]
        print("building OpenVINO peer:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        # the tokenizer: the export's tokenizer.json behind a plain PreTrainedTokenizerFast config
        # (converting the GGUF-derived HF tokenizer crashed convert_tokenizer)
        shutil.copy(Path(directory) / manifest.tokenizer_file, tok_dir / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": manifest.bos_token,
                  "eos_token": manifest.eos_token, "pad_token": manifest.eos_token,
                  "model_max_length": manifest.max_positions}
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
        cmd = [sys.executable, "-c", "from openvino_tokenizers.cli_tools.convert_tokenizer import convert_hf_tokenizer; "
               "convert_hf_tokenizer()", str(tok_dir), "--with-detokenizer", "-o", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def openvino_eviction(mode: str, budget: int, start: int = OPENVINO_BLOCK, recent: int = 2 * OPENVINO_BLOCK,
                      kvcrush_ratio: float = 0.25):
    """OpenVINO GenAI's own cache eviction at a per-sequence budget of `budget` tokens (rounded down to
    whole 32-token blocks): mode 'snapkv' (SnapKV scores, NORM_SUM) keeps max_cache_size = budget;
    'kvcrush' keeps (1 - ratio) of it by SnapKV scores plus ratio of it as KVCrush blocks (those come
    on top of max_cache_size), so both hold the same total."""
    import openvino_genai as ov_genai

    block = OPENVINO_BLOCK
    total = max(budget // block, (start + recent) // block + 1) * block
    crush = None
    keep = total
    if mode == "kvcrush":
        crush_blocks = max(1, round(total * kvcrush_ratio / block))
        keep = total - crush_blocks * block
        crush = ov_genai.KVCrushConfig(crush_blocks, ov_genai.KVCrushAnchorPointMode.RANDOM)
    elif mode != "snapkv":
        raise ValueError(f"OpenVINO eviction mode {mode!r} is unknown; use 'snapkv' or 'kvcrush'")
    keep = max(keep, start + recent + block)
    return ov_genai.CacheEvictionConfig(start, recent, keep, ov_genai.AggregationMode.NORM_SUM, apply_rotation=False,
                                        snapkv_window_size=32, kvcrush_config=crush)
