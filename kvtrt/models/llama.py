"""Llama family (Llama 2/3 incl. llama3 rope scaling, SmolLM2): HF weights -> DecoderGraph."""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import SCORE_HEADS, GraphVariant
from .base import ArchConfig, DecoderGraph, DecoderGroupGraph, rotate_half_matrix


class UnsupportedModelError(ValueError):
    """The model cannot be exported as it is; the message says why and what to do."""


class LlamaAdapter:
    """Maps a Hugging Face Llama-style causal LM onto `DecoderGraph`."""

    model_types: tuple[str, ...] = ("llama",)
    qkv_bias: bool = False

    def check(self, config, max_positions: int) -> None:
        """Raise `UnsupportedModelError` for configurations the graph does not reproduce."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={config.hidden_act!r} is not supported (only silu)")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        if getattr(config, "attention_bias", False) and not self.qkv_bias:
            raise UnsupportedModelError("attention_bias=True is not supported for this family")

    def arch(self, config, max_positions: int) -> ArchConfig:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ArchConfig(
            model_type=config.model_type,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_eps=float(config.rms_norm_eps),
            qkv_bias=self.qkv_bias,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=max_positions,
        )

    def weights(self, model, arch: ArchConfig, dtype: torch.dtype) -> dict[str, Tensor]:
        """HF state dict -> DecoderGraph weights: projections pre-transposed to [in, out], q/k/v and
        gate/up fused, the attention scale folded into the query projection."""
        sd = model.state_dict()
        out: dict[str, Tensor] = {}

        def put(name: str, tensor: Tensor, transpose: bool = False) -> None:
            tensor = tensor.detach().to(dtype)
            out[name] = (tensor.t() if transpose else tensor).contiguous()

        embed = sd["model.embed_tokens.weight"]
        if arch.tie_embeddings:
            put("lm_head.weight_t", embed, transpose=True)
        else:
            put("embed.weight", embed)
            put("lm_head.weight_t", sd["lm_head.weight"], transpose=True)
        put("norm.weight", sd["model.norm.weight"])
        put("rope.rotate_half", rotate_half_matrix(arch.head_dim))
        scale = arch.head_dim ** -0.5  # folded into the query projection
        for i in range(arch.n_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            put(dst + "input_norm.weight", sd[src + "input_layernorm.weight"])
            put(dst + "post_norm.weight", sd[src + "post_attention_layernorm.weight"])
            attn = src + "self_attn."
            qkv = [sd[attn + "q_proj.weight"] * scale, sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"]]
            put(dst + "qkv.weight_t", torch.cat(qkv), transpose=True)
            if attn + "q_proj.bias" in sd:
                put(dst + "qkv.bias", torch.cat([sd[attn + "q_proj.bias"] * scale, sd[attn + "k_proj.bias"],
                                                 sd[attn + "v_proj.bias"]]))
            put(dst + "o.weight_t", sd[attn + "o_proj.weight"], transpose=True)
            mlp = src + "mlp."
            put(dst + "gate_up.weight_t", torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]]),
                transpose=True)
            put(dst + "down.weight_t", sd[mlp + "down_proj.weight"], transpose=True)
        return out

    @staticmethod
    def rope(model) -> tuple[Tensor, float]:
        """inv_freq and attention scaling exactly as HF computed them (covers llama3/yarn/linear)."""
        rotary = model.model.rotary_emb
        return rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0))

    def build(self, model, max_positions: int, dtype: torch.dtype, variant: GraphVariant | str,
              attention: str = "ops", score_heads: str = SCORE_HEADS[0], layers: range | None = None,
              next_layers: range = range(0)) -> DecoderGraph:
        """The exportable module for `model`, for one graph variant (see `DecoderGraph`), or with
        `layers` one decode group / the lookahead graph (see `DecoderGroupGraph`)."""
        arch = self.arch(model.config, max_positions)
        inv_freq, scaling = self.rope(model)
        if layers is not None:
            return DecoderGroupGraph(arch, self.weights(model, arch, dtype), inv_freq, scaling, layers=layers,
                                     next_layers=next_layers, score_heads=score_heads)
        return DecoderGraph(arch, self.weights(model, arch, dtype), inv_freq, scaling, variant=variant,
                            attention=attention, score_heads=score_heads)
