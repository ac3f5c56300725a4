"""Peers on the same model: onnxruntime-genai (its model built from the export's source, loaded, and
scored), OpenVINO GenAI (converted once with optimum-intel, its pipelines and its own cache eviction) and
kvpress (its presses on the HF model).

`kvtrt bench --peer ortgenai,openvino`, `kvtrt eval --peer ortgenai|kvpress|openvino` and
`kvtrt bench-serve --peer openvino` use these; onnxruntime-genai and openvino-genai come with the bench
extra (`pip install 'kvtrt[bench]'`), kvpress is installed on its own (`KVPRESS_INSTALL`).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

#: peers `kvtrt bench --peer` accepts (comma-separated or repeated)
PEERS = ("ortgenai", "openvino")
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


# -- OpenVINO GenAI (`kvtrt bench-serve | bench | eval --peer openvino`) ------------------------------------
#: the OpenVINO GenAI CPU block: cache-eviction sizes are whole blocks of this many tokens
OPENVINO_BLOCK = 32
OPTIMUM_CLI_ENV = "KVTRT_OPTIMUM_CLI"
OPENVINO_NO_PPL = ("--peer openvino cannot score perplexity: OpenVINO GenAI's pipelines return generated tokens, "
                   "not the logits of given target tokens; use --task agreement,needle with it (--peer ortgenai or "
                   "kvpress report ppl)")


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
            "`pip install optimum-intel` (it pins its own transformers: a virtualenv of its own works, e.g. "
            "`python -m venv ~/.cache/kvtrt/optimum && ~/.cache/kvtrt/optimum/bin/pip install torch==2.13.0 "
            "optimum-intel openvino==<this environment's openvino version>`, then "
            "`~/.cache/kvtrt/optimum/bin/pip uninstall -y torchvision`; README, \"OpenVINO GenAI side by side\"), "
            f"then set {OPTIMUM_CLI_ENV}=~/.cache/kvtrt/optimum/bin/optimum-cli")
    return found


def build_openvino(directory: str, out: Path, hf=None) -> Path:
    """Convert (once, cached in `out`) the export's source model to OpenVINO IR with fp32 weights
    (`optimum-cli export openvino --task text-generation-with-past --weight-format fp32`), plus an
    OpenVINO tokenizer/detokenizer made from the export's own tokenizer.json (the peer is fed the
    same token ids; its pipeline still loads a tokenizer). `hf`: an in-memory (model, tokenizer).

    Built in `out`.partial and renamed to `out` when complete, so a failed conversion never leaves a
    folder that looks converted (optimum-cli writes its own, unusable, tokenizer files first)."""
    out = Path(out)
    if (out / "openvino_model.xml").is_file() and (out / "openvino_tokenizer.xml").is_file():
        return out
    import shutil

    from ..manifest import Manifest
    from ..models.loading import load_hf

    manifest = Manifest.load(directory)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, tok_dir = Path(tmp) / "hf", Path(tmp) / "tok"
        hf_dir.mkdir()
        tok_dir.mkdir()
        save_plain_hf(*(hf or load_hf(manifest.source)), hf_dir)
        cmd = [optimum_cli(), "export", "openvino", "--model", str(hf_dir), "--task", "text-generation-with-past",
               "--weight-format", "fp32", str(partial)]
        print("building OpenVINO peer:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        # the tokenizer: the export's tokenizer.json behind a plain PreTrainedTokenizerFast config
        # (converting the GGUF-derived HF tokenizer crashed convert_tokenizer)
        spec = json.loads((Path(directory) / manifest.tokenizer_file).read_text(encoding="utf-8"))
        spec["decoder"] = converter_decoder(spec.get("decoder"))
        (tok_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": manifest.bos_token,
                  "eos_token": manifest.eos_token, "pad_token": manifest.eos_token,
                  "model_max_length": manifest.max_positions}
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
        convert = ("from openvino_tokenizers.cli_tools.convert_tokenizer import convert_hf_tokenizer; "
                   "convert_hf_tokenizer()")
        cmd = [sys.executable, "-c", convert, str(tok_dir), "--with-detokenizer", "-o", str(partial)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def converter_decoder(decoder: dict | None) -> dict | None:
    """The tokenizer.json decoder to give openvino-tokenizers' converter: a byte-level vocabulary's own
    `ByteLevel` step when `decoder` is a Sequence that holds one (transformers' GGUF conversion adds
    sentencepiece steps, ByteFallback / Fuse / Replace, beside it, and the converter fails on the mix:
    "Check 'i < m_inputs.size()' failed" in FuseStep), else `decoder` unchanged. Only the peer's
    detokenizer reads it; the peer is fed token ids."""
    if decoder and decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            return byte_level[0]
    return decoder


@dataclass(frozen=True)
class OpenVINOEviction:
    """One OpenVINO GenAI cache-eviction configuration, in tokens (each a multiple of the 32-token block):
    `max_cache_size` tokens kept by score (start + evictable + recent areas), plus `crush_blocks` KVCrush
    blocks on top of it (mode 'kvcrush'). `snapkv_window`: prompt queries whose attention scores the
    prompt (OpenVINO max-pools them over 7 tokens; NORM_SUM accumulates decode scores afterwards)."""

    mode: str  # snapkv | kvcrush
    max_cache_size: int
    start: int = OPENVINO_BLOCK
    recent: int = 2 * OPENVINO_BLOCK
    snapkv_window: int = 32
    crush_blocks: int = 0
    anchor: str = "random"
    seed: int = 0

    @property
    def tokens(self) -> int:
        """Tokens a sequence keeps after an eviction (OpenVINO evicts whole blocks only, so between
        evictions it holds up to a block - 1 more)."""
        return self.max_cache_size + self.crush_blocks * OPENVINO_BLOCK

    @property
    def label(self) -> str:
        areas = f"start={self.start},recent={self.recent},window={self.snapkv_window}"
        if self.mode == "kvcrush":
            return (f"KVCrush(max_cache_size={self.max_cache_size},blocks={self.crush_blocks},anchor={self.anchor},"
                    f"{areas})")
        return f"SnapKV(max_cache_size={self.max_cache_size},{areas})"

    def config(self):
        """The `openvino_genai.CacheEvictionConfig`."""
        import openvino_genai as ov_genai

        crush = None
        if self.mode == "kvcrush":
            anchor = getattr(ov_genai.KVCrushAnchorPointMode, self.anchor.upper())
            crush = ov_genai.KVCrushConfig(self.crush_blocks, anchor, self.seed)
        return ov_genai.CacheEvictionConfig(self.start, self.recent, self.max_cache_size,
                                            ov_genai.AggregationMode.NORM_SUM, apply_rotation=False,
                                            snapkv_window_size=self.snapkv_window, kvcrush_config=crush)


def openvino_eviction_sizes(mode: str, budget: int, start: int = OPENVINO_BLOCK, recent: int = 2 * OPENVINO_BLOCK,
                            kvcrush_ratio: float = 0.25, **options) -> OpenVINOEviction:
    """OpenVINO GenAI's own cache eviction at a per-sequence budget of `budget` tokens, rounded down to
    whole 32-token blocks (but never below start + recent + one evictable block: check `.tokens`
    against the budget): mode 'snapkv' (SnapKV scores, NORM_SUM) keeps max_cache_size = budget;
    'kvcrush' keeps (1 - ratio) of it by SnapKV scores plus ratio of it as KVCrush blocks (those come
    on top of max_cache_size), so both hold the same total. `options`: the other `OpenVINOEviction` fields."""
    if mode not in ("snapkv", "kvcrush"):
        raise ValueError(f"OpenVINO eviction mode {mode!r} is unknown; use 'snapkv' or 'kvcrush'")
    block = OPENVINO_BLOCK
    total = max(budget // block, (start + recent) // block + 1) * block
    keep, crush_blocks = total, 0
    if mode == "kvcrush":
        crush_blocks = max(1, round(total * kvcrush_ratio / block))
        keep = total - crush_blocks * block
    keep = max(keep, start + recent + block)
    return OpenVINOEviction(mode, keep, start, recent, crush_blocks=crush_blocks, **options)


def openvino_eviction(mode: str, budget: int, start: int = OPENVINO_BLOCK, recent: int = 2 * OPENVINO_BLOCK,
                      kvcrush_ratio: float = 0.25):
    """The `CacheEvictionConfig` of `openvino_eviction_sizes` (SnapKV window 32, random KVCrush anchor)."""
    return openvino_eviction_sizes(mode, budget, start, recent, kvcrush_ratio).config()


def openvino_counterpart(spec, context: int, score_window: int = 32) -> OpenVINOEviction | None:
    """OpenVINO GenAI's eviction for a kvtrt KV spec at `context` prompt tokens, or None when it has none:

    - snapkv -> its SnapKV eviction (snapkv_window_size = the export's score window, the queries kvtrt
      scores the prompt with; start / recent areas = kvtrt's sink / window rounded up to whole blocks);
    - kvcrush with base=snapkv -> its KVCrush eviction (ratio, anchor and seed from the spec);
    - anything else (h2o, streaming, other KVCrush bases, retrieval) -> None.

    The budget is kvtrt's kept-token count rounded down to 32-token blocks (`openvino_eviction_sizes`);
    the result's `.tokens` may exceed it when the budget is below OpenVINO's smallest cache
    (start + recent + one block, plus the KVCrush blocks): the caller decides."""
    from ..runtime.kv.policies import KVCrushPolicy, SnapKVPolicy

    policy = spec.compaction
    if policy is None or spec.retrieval is not None:
        return None
    if type(policy) is SnapKVPolicy:
        mode, base, options = "snapkv", policy, {}
    elif type(policy) is KVCrushPolicy and type(policy.base) is SnapKVPolicy:
        mode, base, options = "kvcrush", policy.base, {"kvcrush_ratio": policy.ratio, "anchor": policy.anchor,
                                                       "seed": policy.seed}
    else:
        return None
    block = OPENVINO_BLOCK
    start = max(1, -(-base.sink // block)) * block
    recent = max(1, -(-base.window // block)) * block
    keep = min(policy.budget_tokens(context), context)
    return openvino_eviction_sizes(mode, keep, start, recent, snapkv_window=score_window, **options)


def openvino_kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, precision: str) -> int:
    """KV bytes one token takes in OpenVINO's CPU cache: f32 4 bytes a value; u8 one byte a value plus an
    f32 scale and zero point per token, head and K/V (an estimate: the pipeline reports only a usage %)."""
    per_head = 4 * head_dim if precision == "f32" else head_dim + 8
    return 2 * layers * kv_heads * per_head


class OpenVINOPeer:
    """OpenVINO GenAI (`kvtrt eval --peer openvino`): its ContinuousBatchingPipeline on the converted model
    (`build_openvino`), fed the same token ids, f32 compute and f32 KV (KV_CACHE_PRECISION=f32, where its
    full-cache greedy output equals kvtrt's token for token), greedy, one request at a time. One pipeline
    per cache configuration: the full cache, or one `OpenVINOEviction` (eviction is a pipeline setting).
    Its pipelines return tokens, not the logits of given targets, so there is no perplexity."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, prefill_chunk: int = 512):
        try:
            import openvino_genai as ov_genai
        except ImportError:
            raise RuntimeError("the OpenVINO peer needs openvino-genai: `pip install 'kvtrt[bench]'`") from None
        if not (Path(model_dir) / "openvino_model.xml").is_file():
            raise FileNotFoundError(f"no OpenVINO model (openvino_model.xml) in {model_dir}")
        self.model_dir, self.threads, self.prefill_chunk = str(model_dir), threads, prefill_chunk
        self.version = ov_genai.__version__.split("-")[0]

    def generate(self, prompts: list[list[int]], new_tokens: int, eviction: OpenVINOEviction | None = None,
                 stop_ids: list[int] | None = None) -> list[list[int]]:
        """Greedy tokens for each prompt, with the full cache (`eviction` None) or that eviction; exactly
        `new_tokens` each, or up to them ending before one of `stop_ids` (the EOS ids; left out, as kvtrt
        leaves EOS out of its tokens)."""
        from .concurrency import openvino_drive, openvino_generation_config, openvino_pipeline

        pipe = openvino_pipeline(self.model_dir, "full-f32" if eviction is None else eviction.mode, self.threads,
                                 0, self.prefill_chunk, 1, eviction=None if eviction is None else eviction.config())
        try:
            config = openvino_generation_config(new_tokens, stop_ids)
            traces = openvino_drive(pipe, prompts, 1, new_tokens, configs=[config] * len(prompts))
        finally:
            del pipe
        stop = set(stop_ids or ())
        return [t.tokens[:-1] if t.tokens and t.tokens[-1] in stop else t.tokens for t in traces]


# -- kvpress (`kvtrt eval --peer kvpress`) ----------------------------------------------------------------
#: peers `kvtrt eval --peer` accepts (bench and bench-serve keep their own lists)
EVAL_PEERS = ("ortgenai", "kvpress", "openvino")
KVPRESS_INSTALL = ("pip install --no-deps kvpress && pip install 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' datasets "
                   "(kvpress 0.5.5 declares transformers<5.3 but runs on the installed 5.x for these presses; "
                   "`import kvpress` imports cachetools, fire and datasets)")


def kvpress_ratio(keep: int, context: int) -> float:
    """kvpress's `compression_ratio` that keeps exactly `keep` of `context` tokens (kvpress keeps
    int(context * (1 - ratio)); 1 - budget fraction would lose a token to float rounding)."""
    return 1.0 - (keep + 0.5) / context


def kvpress_press(policy, keep: int, context: int):
    """The kvpress press that corresponds to kvtrt compaction `policy` keeping `keep` of `context` tokens,
    or None when kvpress has none:

    - snapkv -> SnapKVPress(window_size=window, kernel_size=kernel) (avg pooling only: kvpress has no max);
    - h2o -> ObservedAttentionPress (kvpress's H2O: mean attention each key gets from every prompt query;
      needs eager attention);
    - streaming -> StreamingLLMPress(n_sink=sink);
    - kvcrush -> KVCrushPress if the installed kvpress has one (0.5.5 has not);
    - adakv -> AdaKVPress(its base's press, alpha_safeguard=floor) (kvpress's safeguard is a share of the
      whole uniform budget, kvtrt's `floor` a share of it beyond sink and window).

    kvpress selects tokens, so a `block=N` (N > 1) selection has no counterpart.
    """
    import kvpress

    from ..runtime.kv.policies import AdaKVPolicy, H2OPolicy, KVCrushPolicy, SnapKVPolicy, StreamingPolicy

    if type(policy) is AdaKVPolicy:
        base = kvpress_press(policy.base, keep, context)
        return None if base is None else kvpress.AdaKVPress(press=base, alpha_safeguard=policy.floor)
    ratio = kvpress_ratio(keep, context)
    if getattr(policy, "block", 1) != 1:
        return None
    if type(policy) is SnapKVPolicy:
        if policy.pool != "avg":
            return None
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=policy.window, kernel_size=policy.kernel)
    if type(policy) is H2OPolicy:
        return kvpress.ObservedAttentionPress(compression_ratio=ratio)
    if type(policy) is StreamingPolicy:
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=policy.sink)
    if type(policy) is KVCrushPolicy and hasattr(kvpress, "KVCrushPress"):
        return kvpress.KVCrushPress(compression_ratio=ratio)
    return None


def press_label(press) -> str:
    """`SnapKVPress(window_size=32,kernel_size=5)`: the press class and its options except the ratio."""
    from dataclasses import fields

    opts = ",".join(f"{f.name}={getattr(press, f.name)}" for f in fields(press) if f.name != "compression_ratio")
    return f"{type(press).__name__}({opts})"


class KVPressPeer:
    """kvpress's presses on the HF model (dequantized from the export's source, as `load_hf` gives it).

    One prefill per sample serves every press: each press's `compress` runs in a forward hook on every
    attention layer with the same arguments its own `forward_hook` passes (the layer's hidden states, the
    uncompressed keys/values, the eager attention weights, the forward kwargs), and its result is kept
    as that press's cache, so the prefill itself (and its last logits) is the uncompressed one, as with a
    single press. The continuation then runs on each compressed cache with explicit positions
    (context_length + i, as kvpress's pipeline does)."""

    def __init__(self, source: str, threads: int | None = None, hf=None):
        try:
            import kvpress  # (patches transformers' attention functions, as kvpress always does)
        except ImportError as e:
            raise RuntimeError(f"the kvpress peer needs kvpress ({e}); install it with {KVPRESS_INSTALL}") from None
        import inspect

        import torch

        if threads:
            torch.set_num_threads(threads)
        if hf is None:
            from ..models.loading import load_hf

            hf = load_hf(source)
        self.model = hf[0].eval()
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

        self.version = getattr(kvpress, "__version__", None) or _dist_version("kvpress")

    def _prefill(self, prompt: list[int], presses: dict[str, object]):
        """Last logits [V] of the uncompressed prefill, and {label: [(keys, values)] per layer} per press
        (plus 'full')."""
        import torch
        from transformers import DynamicCache

        from kvpress.utils import extract_keys_and_values

        model, inner = self.model, self._decoder
        n_layers = len(inner.layers)
        # one stand-in cache per press: press.forward_hook reads layers[l].keys/.values and writes its result there
        shims = {label: SimpleNamespace(layers=[SimpleNamespace(keys=None, values=None) for _ in range(n_layers)])
                 for label in presses}
        full = [None] * n_layers
        masks = {label: [None] * n_layers for label in presses}

        def hook(module, args, kwargs, output):
            # transformers 5.x passes the cache as `cache` and no `cache_position`; kvpress 0.5.5's
            # forward_hook reads `past_key_values` and `cache_position` (its prefill test): give it both
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            q_len = kwargs["hidden_states"].shape[1]
            keys, values = extract_keys_and_values(cache, module.layer_idx)
            full[module.layer_idx] = (keys, values)
            for label, press in presses.items():
                layer = shims[label].layers[module.layer_idx]
                layer.keys, layer.values = keys, values
                press.forward_hook(module, args, {**kwargs, "past_key_values": shims[label],
                                                  "cache_position": torch.arange(q_len)}, output)
                # head-masking presses (AdaKV) keep the full cache and leave the keys to mask on the module,
                # where kvpress's attention patch reads them while decoding: kept per press, set per continuation
                masks[label][module.layer_idx] = getattr(module, "masked_key_indices", None)
                module.masked_key_indices = None
            return output

        eager = any(_needs_attentions(p) for p in presses.values())
        previous = model.config._attn_implementation
        for press in presses.values():
            press.post_init_from_model(model)
        hooks = []
        try:
            if eager:
                model.set_attn_implementation("eager")
            for layer in inner.layers:  # as BasePress.__call__ does
                layer.self_attn.rotary_emb = inner.rotary_emb
                hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prompt]), **{self._cache_kw: DynamicCache()}, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
            if eager:
                model.set_attn_implementation(previous)
        kept = {"full": full}
        kept.update({label: [(layer.keys, layer.values) for layer in shim.layers] for label, shim in shims.items()})
        self._masks = {"full": [None] * n_layers, **masks}
        return out.logits[0, -1], kept

    @property
    def _decoder(self):
        """The model's decoder stack (a multimodal model's language model)."""
        return self.model.model.language_model if hasattr(self.model.model, "language_model") else self.model.model

    def _mask_keys(self, label: str | None) -> None:
        """Set on every attention module the keys press `label` masks (None: none), as kvpress's pipeline
        leaves them after its own prefill."""
        for i, layer in enumerate(self._decoder.layers):
            layer.self_attn.masked_key_indices = None if label is None else self._masks[label][i]

    @staticmethod
    def _cache(layers):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        return cache

    def run(self, prompt: list[int], presses: dict[str, object], targets: list[int] | None = None,
            new_tokens: int = 0) -> dict[str, float | list[int]]:
        """Per label ('full' and each press): with `targets`, the teacher-forced negative log-likelihood
        (nats, summed, float64) of `targets` after `prompt`; else the `new_tokens` greedy tokens."""
        import torch

        last, kept = self._prefill(prompt, presses)
        n = len(prompt)
        results = {}
        with torch.inference_mode(), contextlib.ExitStack() as unmask:
            unmask.callback(self._mask_keys, None)
            for label, layers in kept.items():
                cache = self._cache(layers)
                self._mask_keys(label)
                if targets is not None:
                    logits = [last[None]]
                    if len(targets) > 1:
                        pos = torch.arange(n, n + len(targets) - 1)[None]
                        logits.append(self.model(input_ids=torch.tensor([targets[:-1]]), position_ids=pos,
                                                 **{self._cache_kw: cache}).logits[0])
                    logp = torch.cat(logits).double().log_softmax(-1)
                    results[label] = -float(logp.gather(1, torch.tensor(targets)[:, None]).sum())
                else:
                    tokens = [int(last.argmax())]
                    for i in range(new_tokens - 1):
                        out = self.model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[n + i]]),
                                         **{self._cache_kw: cache})
                        tokens.append(int(out.logits[0, -1].argmax()))
                    results[label] = tokens
        return results


def _needs_attentions(press) -> bool:
    """Presses that score from the attention weights the layer returns (eager attention only)."""
    return type(press).__name__ in ("ObservedAttentionPress",)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
