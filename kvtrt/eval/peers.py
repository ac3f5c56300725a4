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
