"""torch -> ONNX: the graphs (prefill, decode, and with fused attention prefill_shared and
decode_shared) sharing one weights file, plus manifest and tokenizer."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
import transformers
from onnx import TensorProto, external_data_helper
from tqdm.auto import tqdm

from ..contract import (ATTENTION, CONTRACT_VARIANTS, DEFAULT_SCORE_WINDOW, IN_PLACE_VARIANTS, KV_DTYPES, SCORE_HEADS,
                        WEIGHTS_FILE, GraphVariant, group_bounds, group_graphs, group_names, input_names, output_names)
from ..manifest import Manifest, generation_defaults, generation_eos_ids
from ..models import get_adapter
from ..models.loading import DEFAULT_MODEL, load_hf
from ..plugins import PLACEHOLDER_DOMAIN, to_contrib_ops
from .kv_dtype import fp16_kv

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ALIGN = 1 << 16  # external data offsets aligned so ORT can map them
INLINE_LIMIT = 1024  # smaller initializers stay inside the graph


def export_model(model=DEFAULT_MODEL, out_dir: str | os.PathLike = "kvtrt-export", *, dtype: str = "fp32",
                 max_positions: int | None = None, score_window: int = DEFAULT_SCORE_WINDOW, opset: int = 18,
                 attention: str = "auto", score_heads: str = SCORE_HEADS[0], decode_groups: int = 0,
                 kv_dtype: str | None = None, progress: bool = True) -> Manifest:
    """Export `model` to `out_dir` and return the manifest.

    `model` is a HF folder, a .gguf file, an alias (see `kvtrt.models.loading.ALIASES`), or an
    already loaded `(transformers model, tokenizer)` pair. `attention`: "gqa" (ONNX Runtime's
    fused GroupQueryAttention in the prefill graph, plus `prefill_shared` and `decode_shared`
    graphs that write the KV cache in place; fastest on CPU), "ops" (standard ONNX ops only, which TensorRT needs), or
    "auto" (gqa for fp32, ops for fp16). `score_heads`: "query" (`score.{l}` per query head, what
    `kvcrush:signature=query` reads) or "kv" (averaged per KV group, the format before this option).
    `decode_groups`: also write decode_shared cut into that many layer ranges, with lookahead
    queries (`kvtrt.contract`), which FreeKV/Quest use to choose pages with each step's own query;
    0: none. Needs attention "gqa". `kv_dtype`: the KV cache's dtype (default: `dtype`); "fp16" on an
    fp32 export halves the cache (`kvtrt.export.kv_dtype`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    kv_dtype = kv_dtype or dtype
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not supported; use one of {', '.join(KV_DTYPES)}")
    if dtype == "fp16" and kv_dtype != "fp16":
        raise ValueError("an fp16 export keeps its KV in fp16; drop --kv-dtype or export with --dtype fp32")
    if attention == "auto":
        attention = "gqa" if dtype == "fp32" else "ops"
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r} is unknown; use auto, {', '.join(ATTENTION)}")
    if score_heads not in SCORE_HEADS:
        raise ValueError(f"score_heads {score_heads!r} is unknown; use one of {', '.join(SCORE_HEADS)}")
    if decode_groups and attention != "gqa":
        raise ValueError(f"--decode-groups cuts the in-place decode graph, which needs attention 'gqa' (this export "
                         f"uses {attention!r}); drop --decode-groups or use --attention gqa")
    out = Path(out_dir)
    bar = tqdm(total=6, desc="kvtrt export", disable=not progress, unit="step")
    bar.set_postfix_str("loading model")
    if isinstance(model, tuple):
        hf_model, tokenizer = model
        source = getattr(hf_model.config, "_name_or_path", "") or "in-memory model"
    else:
        hf_model, tokenizer = load_hf(model)
        source = str(model)
    config = hf_model.config
    adapter = get_adapter(config.model_type)
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    max_positions = max_positions or limit
    if limit and max_positions > limit:
        raise ValueError(f"--max-positions {max_positions} exceeds the model's {limit} positions; use at most {limit}")
    adapter.check(config, max_positions)
    arch = adapter.arch(config, max_positions)
    bounds = group_bounds(arch.n_layers, decode_groups) if decode_groups else []
    bar.total += bool(bounds)
    bar.update()

    out.mkdir(parents=True, exist_ok=True)
    variants = CONTRACT_VARIANTS + (IN_PLACE_VARIANTS if attention == "gqa" else ())
    graphs = {str(variant): variant.onnx_file for variant in variants}  # manifest keys are plain strings
    bar.total += len(graphs) - 2
    protos = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            bar.set_postfix_str(f"tracing {variant} graph")
            module = adapter.build(hf_model, max_positions, DTYPES[dtype], variant, attention=attention,
                                   score_heads=score_heads)
            protos[str(variant)] = _trace(module, arch, variant, Path(tmp) / variant.onnx_file, opset, DTYPES[dtype])
            bar.update()
        if bounds:
            bar.set_postfix_str(f"tracing {decode_groups} decode groups")
            for key, layers, following in group_graphs(bounds):
                module = adapter.build(hf_model, max_positions, DTYPES[dtype], GraphVariant.DECODE_SHARED,
                                       attention=attention, score_heads=score_heads, layers=layers,
                                       next_layers=following)
                graphs[key] = f"{key}.onnx"
                protos[key] = _trace_group(module, arch, layers, following, Path(tmp) / graphs[key], opset,
                                           DTYPES[dtype])
            bar.update()
        if kv_dtype != dtype:  # fp16 K/V I/O on an fp32 model, before the graphs are written
            for proto in protos.values():
                fp16_kv(proto)
        bar.set_postfix_str("writing weights")
        save_shared(protos, graphs, out)
        bar.update()
    bar.set_postfix_str("checking graphs")
    for name in graphs.values():
        onnx.checker.check_model(str(out / name))
    bar.update()

    bar.set_postfix_str("tokenizer + manifest")
    manifest = Manifest(
        model_type=arch.model_type, source=source, n_layers=arch.n_layers, n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads, head_dim=arch.head_dim, hidden_size=arch.hidden_size,
        vocab_size=arch.vocab_size, dtype=dtype, max_positions=max_positions, score_window=score_window,
        graphs=graphs, weights_file=WEIGHTS_FILE, export_options={"dtype": dtype, "max_positions": max_positions,
                                                                   "score_window": score_window, "opset": opset,
                                                                   "attention": attention,
                                                                   "score_heads": score_heads,
                                                                   "decode_groups": decode_groups,
                                                                   "kv_dtype": kv_dtype,
                                                                   # what converted the weights and tokenizer
                                                                   "transformers": transformers.__version__},
        score_heads=score_heads, kv_dtype=kv_dtype, decode_groups=bounds,
        generation_defaults=generation_defaults(getattr(hf_model, "generation_config", None)),
        **_save_tokenizer(tokenizer, config, out))
    # HF generate stops at generation_config's EOS ids too (Llama 3: <|eot_id|> besides <|end_of_text|>)
    manifest.eos_token_ids = sorted({*manifest.eos_token_ids,
                                     *generation_eos_ids(getattr(hf_model, "generation_config", None))})
    manifest.save(out)
    bar.update()
    bar.close()
    return manifest


def _trace(module, arch, variant: GraphVariant, path: Path, opset: int, dtype: torch.dtype) -> onnx.ModelProto:
    L, Hkv, D = arch.n_layers, arch.n_kv_heads, arch.head_dim
    decode = variant.is_decode
    B, S, P = 2, (1 if decode else 3), 5
    heads = variant is GraphVariant.DECODE_HEADS  # one slot pool per layer: past_owner [B,L,P], K/V [B,1,P,D]
    args = [torch.zeros(B, S, dtype=torch.long), torch.arange(P, P + S).repeat(B, 1),
            torch.arange(L * P).reshape(1, L, P).repeat(B, 1, 1) % Hkv if heads else torch.ones(B, P, dtype=torch.long)]
    if variant.is_prefill:
        args.append(torch.tensor([1, 2]))  # score_queries
    if variant.in_place:  # write_slot: the chunk fills the buffer (decode: one slot per row)
        args.append(torch.full((B,), P - S) if decode else torch.tensor(P - S))
    args += [torch.zeros(B, 1 if heads else Hkv, P, D, dtype=dtype) for _ in range(2 * L)]
    ins, outs = input_names(L, variant), output_names(L, variant)
    past = "capacity" if variant.in_place else "past"
    dyn = {"input_ids": {0: "batch"} if decode else {0: "batch", 1: "new"},
           "position_ids": {0: "batch"} if decode else {0: "batch", 1: "new"},
           ins[2]: {0: "batch", 2: past} if heads else {0: "batch", 1: past}, "logits": {0: "batch"}}
    if not decode:
        dyn["score_queries"] = {0: "score_queries"}
    elif variant.in_place:
        dyn["write_slot"] = {0: "batch"}
    for name in ins:
        if name.startswith(("past_key.", "past_value.")):
            dyn[name] = {0: "batch", 2: past}
    for name in outs[1:]:
        kind = name.split(".")[0]
        if kind.startswith("present_"):
            dyn[name] = {0: "batch", 2: past}
        elif kind in ("key", "value"):
            dyn[name] = {0: "batch"} if decode else {0: "batch", 2: "new"}
        elif kind == "query":
            dyn[name] = {0: "batch"}
        else:
            dyn[name] = {0: "batch", 2: "past_plus_new"}  # score
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(args), str(path), input_names=ins, output_names=outs,
                          dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True,
                          custom_opsets={PLACEHOLDER_DOMAIN: 1} if module.fused else None)
    return to_contrib_ops(onnx.load(str(path), load_external_data=True))


def _trace_group(module, arch, layers: range, following: range, path: Path, opset: int,
                 dtype: torch.dtype) -> onnx.ModelProto:
    """Trace one decode group, or the lookahead graph when `layers` is empty (`kvtrt.contract`)."""
    B, P = 2, 5
    first = torch.zeros(B, 1, dtype=torch.long) if layers.start == 0 else torch.zeros(B, 1, arch.hidden_size,
                                                                                       dtype=dtype)
    args = [first, torch.full((B, 1), P - 1, dtype=torch.long)]
    ins, outs = group_names(layers, following, arch.n_layers)
    if layers:
        args += [torch.ones(B, P, dtype=torch.long), torch.full((B,), P - 1)]
        args += [torch.zeros(B, arch.n_kv_heads, P, arch.head_dim, dtype=dtype) for _ in range(2 * len(layers))]
    dyn = {name: {0: "batch"} for name in (*ins, *outs) if not name.startswith(("past_", "present_"))}
    for name in ins[2:] + outs:
        if name.startswith(("past_", "present_")):
            dyn[name] = {0: "batch", 2: "capacity"}
    if layers:
        dyn["past_mask"] = {0: "batch", 1: "capacity"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(args), str(path), input_names=ins, output_names=outs,
                          dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True,
                          custom_opsets={PLACEHOLDER_DOMAIN: 1} if layers else None)
    return to_contrib_ops(onnx.load(str(path), load_external_data=True))


def save_shared(protos: dict[str, onnx.ModelProto], graphs: dict[str, str], out: Path) -> None:
    """Write every large initializer once into WEIGHTS_FILE and point all graphs at it."""
    written: dict[str, tuple[int, int, bytes]] = {}
    with open(out / WEIGHTS_FILE, "wb") as f:
        for variant, proto in protos.items():
            for tensor in proto.graph.initializer:
                data = tensor.raw_data
                if len(data) < INLINE_LIMIT:
                    continue
                if tensor.name in written:
                    offset, length, digest = written[tensor.name]
                    if length != len(data) or digest != _digest(data):
                        raise RuntimeError(f"initializer {tensor.name} differs between graphs")
                else:
                    offset = -(-f.tell() // ALIGN) * ALIGN
                    f.seek(offset)
                    f.write(data)
                    length = len(data)
                    written[tensor.name] = (offset, length, _digest(data))
                external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
            onnx.save_model(proto, str(out / graphs[variant]))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _save_tokenizer(tokenizer, config, out: Path) -> dict:
    """Save tokenizer.json and return the manifest's tokenizer fields."""
    tokenizer.save_pretrained(str(out))
    tokenizer_file = "tokenizer.json"
    if not (out / tokenizer_file).is_file():
        raise ValueError("kvtrt needs a fast tokenizer (tokenizer.json); this model's tokenizer has none")
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(out / tokenizer_file))
    probe = "Hello world, this is kvtrt."
    hf_ids = tokenizer(probe).input_ids
    raw_ids = raw.encode(probe, add_special_tokens=False).ids
    if hf_ids == raw_ids:
        add_bos = False
    elif tokenizer.bos_token_id is not None and hf_ids == [tokenizer.bos_token_id] + raw_ids:
        add_bos = True
    else:
        raise ValueError("the tokenizer adds special tokens kvtrt cannot reproduce "
                         f"(HF {hf_ids[:8]} vs raw {raw_ids[:8]})")
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return {"tokenizer_file": tokenizer_file, "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": eos_ids,
            "add_bos": add_bos, "chat_template": template, "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token}


__all__ = ["export_model", "save_shared", "DTYPES"]
