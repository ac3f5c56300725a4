"""The exportable forward shared by every Llama-family adapter.

`DecoderGraph` re-implements the decoder with the weights taken from a Hugging Face model, in
the shape of the kvtrt graph contract (README, "The graph contract"):

inputs   input_ids [B,S] int64, position_ids [B,S] int64, past_mask [B,P] int64 (1 = live slot),
         past_key.{l} / past_value.{l} [B,Hkv,P,D] (keys already rotated)
outputs  logits [B,1,V] (last new token), key.{l} / value.{l} [B,Hkv,S,D] (new tokens only),
         query.{l} [B,H,D] (last new token, rotated), score.{l} [B,Hkv,P+S] (attention mass per
         key from the last `score_window` queries, averaged over the query heads of a KV group)

Choices that the measurements in ARCHITECTURE.md motivated:
- GQA without repeating K/V: queries are regrouped to [B,Hkv,group*S,D].
- Past and new keys are scored separately and only the small score matrices are concatenated,
  so the cache is never copied inside the graph.
- `decode=True` builds the S=1 variant that computes K_past @ q^T (the large operand streams)
  and transposes the small result; prefill keeps the grouped ordering.
- RMSNorm as w * (x / sqrt(mean(x^2) + eps)), which ORT fuses.
- Weights are stored pre-transposed ([in, out]) so every projection is a plain MatMul on a named
  initializer; a tied embedding is stored once, as the lm_head matrix, and looked up by column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ArchConfig:
    """Shapes and constants of a Llama-family decoder, as the graph needs them."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    max_positions: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


class DecoderGraph(nn.Module):
    """Llama-family decoder forward in the kvtrt graph contract (see module docstring)."""

    def __init__(self, arch: ArchConfig, weights: dict[str, Tensor], inv_freq: Tensor,
                 rope_scaling: float = 1.0, score_window: int = 32, decode: bool = False):
        super().__init__()
        self.arch = arch
        self.score_window = score_window
        self.decode = decode
        self.rope_scaling = float(rope_scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        for name, tensor in weights.items():
            self.register_parameter(name.replace(".", "_"), nn.Parameter(tensor, requires_grad=False))

    def w(self, name: str) -> Tensor:
        return getattr(self, name.replace(".", "_"))

    def has(self, name: str) -> bool:
        return hasattr(self, name.replace(".", "_"))

    def rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.arch.rms_eps)
        return weight * x.to(dtype)

    def linear(self, x: Tensor, name: str) -> Tensor:
        y = x @ self.w(name + ".weight_t")
        if self.has(name + ".bias"):
            y = y + self.w(name + ".bias")
        return y

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B,S,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype).unsqueeze(1)  # [B,1,S,D]
        sin = (emb.sin() * self.rope_scaling).to(dtype).unsqueeze(1)
        return cos, sin

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_mask: Tensor, *past: Tensor):
        a = self.arch
        B, S = input_ids.shape[0], input_ids.shape[1]
        H, Hkv, D, g = a.n_heads, a.n_kv_heads, a.head_dim, a.group
        table = self.w("lm_head.weight_t")  # [hidden, V]
        if a.tie_embeddings:
            h = table.index_select(1, input_ids.reshape(-1)).transpose(0, 1).reshape(B, S, a.hidden_size)
        else:
            h = self.w("embed.weight")[input_ids]
        dtype = h.dtype
        cos, sin = self.rope(position_ids, dtype)
        neg_inf = torch.tensor(float("-inf"), dtype=dtype)
        zero = torch.tensor(0.0, dtype=dtype)
        past_bias = torch.where(past_mask.unsqueeze(1).unsqueeze(1) != 0, zero, neg_inf)  # [B,1,1,P]
        if not self.decode:
            # causal among the new tokens by absolute position, tiled over the query group
            allowed = position_ids.unsqueeze(1) <= position_ids.unsqueeze(2)  # [B,S(q),S(k)]
            new_bias = torch.where(allowed, zero, neg_inf).unsqueeze(1).unsqueeze(1)
            new_bias = new_bias.expand(B, 1, g, S, S).reshape(B, 1, g * S, S)
        scale = D ** -0.5
        outputs_kv, outputs_q, outputs_s = [], [], []
        for layer in range(a.n_layers):
            p = f"layers.{layer}."
            past_k, past_v = past[2 * layer], past[2 * layer + 1]
            x = self.rms_norm(h, self.w(p + "input_norm.weight"))
            q = self.linear(x, p + "q").reshape(B, S, H, D).transpose(1, 2)
            k = self.linear(x, p + "k").reshape(B, S, Hkv, D).transpose(1, 2)
            v = self.linear(x, p + "v").reshape(B, S, Hkv, D).transpose(1, 2)
            q = self.rotate(q, cos, sin)
            k = self.rotate(k, cos, sin)
            outputs_kv += [k, v]
            outputs_q.append(q[:, :, -1, :])
            qg = q.reshape(B, Hkv, g * S, D) * scale
            if self.decode:
                s_past = torch.matmul(past_k, qg.transpose(2, 3)).transpose(2, 3)  # [B,Hkv,g,P]
                s_new = torch.matmul(qg, k.transpose(2, 3))  # [B,Hkv,g,1]
            else:
                s_past = torch.matmul(qg, past_k.transpose(2, 3))  # [B,Hkv,g*S,P]
                s_new = torch.matmul(qg, k.transpose(2, 3)) + new_bias  # [B,Hkv,g*S,S]
            probs = torch.softmax(torch.cat((s_past + past_bias, s_new), dim=-1), dim=-1)
            n_past = past_k.shape[2]
            attn = torch.matmul(probs[..., :n_past], past_v) + torch.matmul(probs[..., n_past:], v)
            attn = attn.reshape(B, Hkv, g, S, D).permute(0, 3, 1, 2, 4).reshape(B, S, H * D)
            h = h + self.linear(attn, p + "o")
            last = probs.reshape(B, Hkv, g, S, -1)[:, :, :, -self.score_window:, :]
            outputs_s.append(last.mean(dim=(2, 3)).float())
            x = self.rms_norm(h, self.w(p + "post_norm.weight"))
            mlp = torch.nn.functional.silu(self.linear(x, p + "gate")) * self.linear(x, p + "up")
            h = h + self.linear(mlp, p + "down")
        h = self.rms_norm(h[:, -1:, :], self.w("norm.weight"))
        logits = (h @ table).float()
        return (logits, *outputs_kv, *outputs_q, *outputs_s)


def input_names(n_layers: int) -> list[str]:
    names = ["input_ids", "position_ids", "past_mask"]
    for layer in range(n_layers):
        names += [f"past_key.{layer}", f"past_value.{layer}"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for layer in range(n_layers):
        names += [f"key.{layer}", f"value.{layer}"]
    names += [f"query.{layer}" for layer in range(n_layers)]
    names += [f"score.{layer}" for layer in range(n_layers)]
    return names
