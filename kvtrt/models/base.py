"""The exportable forward shared by every Llama-family adapter.

`DecoderGraph` re-implements the decoder with the weights taken from a Hugging Face model, as
one of the graph variants of `kvtrt.contract` (whose docstring lists the inputs and outputs):
`prefill` and `decode` carry the full contract, `prefill_shared` and `decode_shared` write the
new K/V into the bound store in place. The fused ops and their standard-op fallbacks live in
`kvtrt.plugins`.

Choices that measurements motivated (ARCHITECTURE.md, README "Design"):
- GQA without repeating K/V: queries are regrouped to [B,Hkv,group*S,D].
- Past and new keys are scored separately in decode, so the cache is never copied inside the
  graph; decode scores past keys as one broadcast GEMV per query head.
- RMSNorm as w * (x / sqrt(mean(x^2) + eps)), which ORT fuses.
- Few, large ops per layer (ORT pays a few microseconds per node on every decode step): fused
  QKV and gate/up projections, q and k rotated together, rotate_half as a MatMul, constant
  reshapes in the decode graph. The query is pre-scaled by 1/sqrt(head_dim): `query.{l}` is the
  rotated query times head_dim**-0.5 (rankings and cosines are unaffected).
- `score.{l}` is computed for the `score_queries` rows only: the runtime asks for the score
  window on a prompt's last chunk and one row on the others.
- Weights are stored pre-transposed ([in, out]) so every projection is a plain MatMul on a named
  initializer; a tied embedding is stored once, as the lm_head matrix, and looked up by column.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor, nn

from ..contract import ATTENTION, SCORE_HEADS, GraphVariant
from ..plugins.attention_inputs import AttentionLengths, CausalRows, ChunkBias, LeadingSlots
from ..plugins.common import fp32, tile_group
from ..plugins.ort_attention import (Dims, PrefillMasks, SharedCacheAttention, fused_grouped_attention,
                                     gemv_attention, grouped_attention, pooled_attention,
                                     row_scores)
from ..plugins.ort_norm import SkipSimplifiedLayerNormalization, add_rms_norm, rms_norm


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
    """Llama-family decoder forward as one graph variant (see the module docstring)."""

    def __init__(self, arch: ArchConfig, weights: dict[str, Tensor], inv_freq: Tensor, rope_scaling: float = 1.0,
                 *, variant: GraphVariant | str = GraphVariant.PREFILL, attention: str = "ops",
                 score_heads: str = SCORE_HEADS[0]):
        super().__init__()
        variant = GraphVariant(variant)
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}; use one of {', '.join(ATTENTION)}")
        if score_heads not in SCORE_HEADS:
            raise ValueError(f"score_heads={score_heads!r}; use one of {', '.join(SCORE_HEADS)}")
        self.score_heads = score_heads
        if variant.in_place and attention != "gqa":
            raise ValueError(f"the in-place {variant} graph needs attention='gqa'")
        self.arch = arch
        self.variant = variant
        #: ORT contrib ops in this graph (prefill with gqa attention, and the in-place graphs)
        self.fused = attention == "gqa" and (variant.is_prefill or variant.in_place)
        self.rope_scaling = float(rope_scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        for name, tensor in weights.items():
            self.register_parameter(name.replace(".", "_"), nn.Parameter(tensor, requires_grad=False))

    # -- weights and small pieces ------------------------------------------------------------------
    def w(self, name: str) -> Tensor:
        return getattr(self, name.replace(".", "_"))

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which the activations share."""
        return self.w("lm_head.weight_t").dtype

    def has(self, name: str) -> bool:
        return hasattr(self, name.replace(".", "_"))

    def linear(self, x: Tensor, name: str) -> Tensor:
        y = x @ self.w(name + ".weight_t")
        if self.has(name + ".bias"):
            y = y + self.w(name + ".bias")
        return y

    def norm(self, x: Tensor, name: str) -> Tensor:
        return rms_norm(x, self.w(name), self.arch.rms_eps)

    def embed(self, input_ids: Tensor, batch, new) -> Tensor:
        """[B,S] ids -> [B,S,E]; a tied table is the lm_head's [E,V], looked up by column."""
        if not self.arch.tie_embeddings:
            return self.w("embed.weight")[input_ids]
        h = self.w("lm_head.weight_t").index_select(1, input_ids.reshape(-1)).transpose(0, 1)
        return h.reshape(batch, new, self.arch.hidden_size)

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin [B,S,1,D] for the positions (HF's rotary, incl. its attention scaling)."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B,S,D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x * cos + rotate_half(x) * sin, with rotate_half as one MatMul by a signed permutation."""
        return x * cos + (x @ self.w("rope.rotate_half")) * sin

    def qkv(self, h: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """The layer's input norm and fused projection, split as (q and k, v)."""
        a = self.arch
        x = self.norm(h, f"layers.{layer}.input_norm.weight")
        return self.linear(x, f"layers.{layer}.qkv").split([(a.n_heads + a.n_kv_heads) * a.head_dim,
                                                            a.n_kv_heads * a.head_dim], dim=-1)

    def mlp(self, x: Tensor, layer: int) -> Tensor:
        p = f"layers.{layer}."
        gate, up = self.linear(x, p + "gate_up").split([self.arch.intermediate_size] * 2, dim=-1)  # one Split
        return self.linear(torch.nn.functional.silu(gate) * up, p + "down")

    def residual_mlp(self, h: Tensor, attn: Tensor, layer: int) -> Tensor:
        """h + attention output projection, then h + MLP(norm(h)), in standard ops."""
        x, h = add_rms_norm(self.linear(attn, f"layers.{layer}.o"), h, self.w(f"layers.{layer}.post_norm.weight"),
                            self.arch.rms_eps)
        return h + self.mlp(x, layer)

    def logits(self, h_last: Tensor) -> Tensor:
        return fp32(h_last @ self.w("lm_head.weight_t"))  # [B,1,V]

    def dims(self, batch, new) -> Dims:
        a = self.arch
        return Dims(batch, new, a.n_heads, a.n_kv_heads, a.head_dim, self.score_heads == "query")

    # -- the graph variants ------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, position_ids: Tensor, past_mask: Tensor, *rest: Tensor):
        variant = self.variant
        if variant.in_place:
            score_queries, write_slot, past = (rest[0], rest[1], rest[2:]) if variant.is_prefill else \
                (None, rest[0], rest[1:])
            return self.forward_in_place(input_ids, position_ids, past_mask, score_queries, write_slot, past)
        if variant.is_prefill:
            return self.forward_prefill(input_ids, position_ids, past_mask, rest[0], rest[1:])
        if variant is GraphVariant.DECODE_HEADS:  # past_mask is past_owner [B,L,P] here
            return self.forward_decode_heads(input_ids, position_ids, past_mask, rest)
        return self.forward_decode(input_ids, position_ids, past_mask, rest)

    def forward_prefill(self, input_ids, position_ids, past_mask, score_queries, past):
        """S new tokens after P past slots: logits, key/value [B,Hkv,S,D], query, score [B,H|Hkv,P+S]."""
        h = self.embed(input_ids, input_ids.shape[0], -1)                     # [B,S,E]
        cos, sin = self.rope(position_ids, h.dtype)                           # [B,S,1,D]
        d = self.dims(input_ids.shape[0], input_ids.shape[1])
        masks = self.prefill_masks(input_ids, position_ids, past_mask, score_queries, h.dtype, d)
        kv, queries, scores = [], [], []
        for layer in range(self.arch.n_layers):
            qk, v = self.qkv(h, layer)
            qk = self.rotate(qk.reshape(d.batch, d.new, d.heads + d.kv_heads, d.head_dim), cos, sin)
            q, k = qk.split([d.heads, d.kv_heads], dim=2)                      # [B,S,H,D], [B,S,Hkv,D]
            queries.append(q[:, -1])                                          # [B,H,D]
            attention = fused_grouped_attention if self.fused else grouped_attention
            attn, k, v, score = attention(q, k, v, past[2 * layer], past[2 * layer + 1], masks, d)
            kv += [k, v]                                                      # [B,Hkv,S,D]
            scores.append(score)                                              # [B,H,P+S]
            h = self.residual_mlp(h, attn, layer)
        return (self.logits(self.norm(h[:, -1:, :], "norm.weight")), *kv, *queries, *scores)

    def prefill_masks(self, input_ids, position_ids, past_mask, score_queries, dtype, d: Dims) -> PrefillMasks:
        """Live past slots, then causal among the new tokens by absolute position: [B,1,S,P+S]."""
        zero, neg_inf = torch.tensor(0.0, dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
        past_bias = torch.where(past_mask.unsqueeze(1).unsqueeze(1) != 0, zero, neg_inf)  # [B,1,1,P]
        allowed = position_ids.unsqueeze(1) <= position_ids.unsqueeze(2)                    # [B,S(q),S(k)]
        new_bias = torch.where(allowed, zero, neg_inf).unsqueeze(1)                         # [B,1,S,S]
        bias = torch.cat((past_bias.expand(-1, 1, d.new, -1), new_bias), dim=-1)
        if not self.fused:
            return PrefillMasks(tile_group(bias, d.group), score_queries)                  # [B,1,gS,P+S]
        score_bias = tile_group(bias.index_select(2, score_queries), d.group)               # [B,1,g*n,P+S]
        return PrefillMasks(bias, score_queries, score_bias, AttentionLengths.apply(input_ids, past_mask, None))

    def forward_decode(self, input_ids, position_ids, past_mask, past):
        """One new token: logits, key/value [B,Hkv,1,D], query, score [B,H|Hkv,P+1]."""
        zero, neg_inf = torch.tensor(0.0, dtype=self.dtype), torch.tensor(float("-inf"), dtype=self.dtype)
        past_bias = torch.where(past_mask.unsqueeze(1).unsqueeze(1) != 0, zero, neg_inf)  # [B,1,1,P]
        n_past = past_mask.shape[1]  # read once: a per-layer shape lookup costs ORT three nodes a layer
        d = self.dims(-1, 1)
        return self.decode_layers(input_ids, position_ids, lambda layer, q, k, v: gemv_attention(
            q, k, v, past[2 * layer], past[2 * layer + 1], past_bias, n_past, d))

    def forward_decode_heads(self, input_ids, position_ids, past_owner, past):
        """One new token over one slot pool per layer shared by the KV heads (`decode_heads`): past K/V
        [B,1,P,D], past_owner [B,L,P] (the KV head of each slot, -1 dead). Each query head attends its
        own KV head's slots and its new token. Outputs as `forward_decode`, score [B,H|Hkv,P+1]."""
        zero, neg_inf = torch.tensor(0.0, dtype=self.dtype), torch.tensor(float("-inf"), dtype=self.dtype)
        d = self.dims(-1, 1)
        head_of = torch.arange(d.heads).div(d.group, rounding_mode="floor").reshape(1, d.heads, 1)  # [1,H,1]

        def attend(layer, q, k, v):
            own = past_owner[:, layer].unsqueeze(1) == head_of                 # [B,H,P]
            return pooled_attention(q, k, v, past[2 * layer], past[2 * layer + 1], torch.where(own, zero, neg_inf), d)

        return self.decode_layers(input_ids, position_ids, attend)

    def decode_layers(self, input_ids, position_ids, attend):
        """The decode forward around `attend(layer, q [B,H,D], k [B,Hkv,D], v) -> (attn, k, v, score)`:
        logits, key/value, query and score of every layer."""
        h = self.embed(input_ids, -1, 1)                                      # [B,1,E]
        cos, sin = self.rope(position_ids, h.dtype)                           # [B,1,1,D]
        d = self.dims(-1, 1)
        kv, queries, scores = [], [], []
        for layer in range(self.arch.n_layers):
            qk, v = self.qkv(h, layer)
            qk = self.rotate(qk.reshape(-1, d.heads + d.kv_heads, d.head_dim), cos.squeeze(1), sin.squeeze(1))
            q, k = qk.split([d.heads, d.kv_heads], dim=1)                      # [B,H,D], [B,Hkv,D]
            attn, k, v, score = attend(layer, q, k, v)
            kv += [k, v]                                                      # [B,Hkv,1,D]
            queries.append(q)
            scores.append(score)                                              # [B,H|Hkv,P+1]
            h = self.residual_mlp(h, attn, layer)
        return (self.logits(self.norm(h[:, -1:, :], "norm.weight")), *kv, *queries, *scores)

    def forward_in_place(self, input_ids, position_ids, past_mask, score_queries, write_slot, past):
        """prefill_shared / decode_shared: the new K/V written into the bound buffers [B,Hkv,C,D]
        at write_slot; outputs logits, the buffers, query and (prefill only) score over the live
        prefix [B,H|Hkv,write_slot+S]."""
        prefill = self.variant.is_prefill
        d = self.dims(input_ids.shape[0], input_ids.shape[1]) if prefill else self.dims(-1, 1)
        h = self.embed(input_ids, d.batch, d.new)                             # [B,S,E]
        cos, sin = self.packed_rope(position_ids, h.dtype)                    # [B,S,H+2Hkv,D]
        lengths = AttentionLengths.apply(input_ids, past_mask, write_slot)
        bias = ChunkBias.apply(past_mask, lengths[1], input_ids, h)           # [B,1,S,total]: live slots
        if prefill:  # score rows: live slots, causal by slot within the chunk, per group
            rows_bias = bias.index_select(2, score_queries) + CausalRows.apply(score_queries, write_slot, lengths[1], h)
            score_bias = tile_group(rows_bias, d.group)                       # [B,1,g*n,total]
        presents, queries, scores = [], [], []
        x = self.norm(h, "layers.0.input_norm.weight")
        for layer in range(self.arch.n_layers):
            qkv, attn, keys, values = self.shared_attention(x, layer, past[2 * layer], past[2 * layer + 1], bias,
                                                            lengths, cos, sin, d)
            presents += [keys, values]                                        # [B,Hkv,C,D]
            queries.append(qkv[:, -1, :d.heads])                              # [B,H,D]
            if prefill:  # over the live prefix [0, total) of the buffer
                q_rows = qkv.index_select(1, score_queries)[:, :, :d.heads]
                scores.append(row_scores(q_rows, LeadingSlots.apply(keys, lengths[1]), score_bias, d.query_scores))
            x, h = self.fused_residual_mlp(h, attn, layer)
        return (self.logits(x[:, -1:] if prefill else x), *presents, *queries, *scores)

    def shared_attention(self, x: Tensor, layer: int, past_k: Tensor, past_v: Tensor, bias: Tensor, lengths,
                         cos: Tensor, sin: Tensor, d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The layer's packed projection of the normed input x [B,S,E], rotated ([B,S,H+2Hkv,D]), and
        its attention over the shared buffers: (qkv, attn [B,S,H*D], keys, values [B,Hkv,C,D])."""
        packed = d.heads + 2 * d.kv_heads
        qkv = self.rotate(self.linear(x, f"layers.{layer}.qkv").reshape(d.batch, d.new, packed, d.head_dim), cos, sin)
        attn, keys, values = SharedCacheAttention.apply(qkv.reshape(d.batch, d.new, packed * d.head_dim), past_k,
                                                        past_v, bias, *lengths, d.heads, d.kv_heads)
        return qkv, attn, keys, values

    def packed_rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin for packed q, k and v heads [B,S,H+2Hkv,D]: v is rotated by the identity
        (cos 1, sin 0, exact), so the packed projection goes to the fused op without a Split."""
        a = self.arch
        cos, sin = self.rope(position_ids, dtype)
        cos = torch.cat((cos.expand(-1, -1, a.n_heads + a.n_kv_heads, -1),
                         torch.ones_like(cos).expand(-1, -1, a.n_kv_heads, -1)), 2)
        sin = torch.cat((sin.expand(-1, -1, a.n_heads + a.n_kv_heads, -1),
                         torch.zeros_like(sin).expand(-1, -1, a.n_kv_heads, -1)), 2)
        return cos, sin

    def fused_residual_mlp(self, h: Tensor, attn: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """`residual_mlp` with each residual add fused into the norm that follows it (the next
        layer's input norm, or the final norm): returns (normed, h)."""
        a, p = self.arch, f"layers.{layer}."
        x, h = SkipSimplifiedLayerNormalization.apply(self.linear(attn, p + "o"), h, self.w(p + "post_norm.weight"),
                                                      a.rms_eps)
        following = f"layers.{layer + 1}.input_norm.weight" if layer + 1 < a.n_layers else "norm.weight"
        return SkipSimplifiedLayerNormalization.apply(self.mlp(x, layer), h, self.w(following), a.rms_eps)


class DecoderGroupGraph(DecoderGraph):
    """One decode group of `kvtrt.contract` (decode_shared over `layers`), or with empty `layers` the
    `decode_lookahead` graph; both end with the lookahead queries of `next_layers`."""

    def __init__(self, arch: ArchConfig, weights: dict[str, Tensor], inv_freq: Tensor, rope_scaling: float = 1.0, *,
                 layers: range, next_layers: range, score_heads: str = SCORE_HEADS[0]):
        super().__init__(arch, weights, inv_freq, rope_scaling, variant=GraphVariant.DECODE_SHARED, attention="gqa",
                         score_heads=score_heads)
        self.layers, self.next_layers = layers, next_layers

    def forward(self, x: Tensor, position_ids: Tensor, past_mask: Tensor | None = None,  # type: ignore[override]
                write_slot: Tensor | None = None, *past: Tensor):
        """x: input_ids [B,1] (the first group, and the lookahead graph) or hidden [B,1,E]."""
        a, d = self.arch, self.dims(-1, 1)
        h = self.embed(x, -1, 1) if self.layers.start == 0 else x              # [B,1,E]
        if not self.layers:  # decode_lookahead
            return tuple(self.lookahead(h, position_ids, d))
        cos, sin = self.packed_rope(position_ids, h.dtype)                    # [B,1,H+2Hkv,D]
        lengths = AttentionLengths.apply(position_ids, past_mask, write_slot)
        bias = ChunkBias.apply(past_mask, lengths[1], position_ids, h)        # [B,1,1,total]
        presents, queries = [], []
        x = self.norm(h, f"layers.{self.layers.start}.input_norm.weight")
        for i, layer in enumerate(self.layers):
            qkv, attn, keys, values = self.shared_attention(x, layer, past[2 * i], past[2 * i + 1], bias, lengths,
                                                            cos, sin, d)
            presents += [keys, values]                                        # [B,Hkv,C,D]
            queries.append(qkv[:, -1, :d.heads])                              # [B,H,D]
            x, h = self.fused_residual_mlp(h, attn, layer)
        head = self.logits(x) if self.layers.stop == a.n_layers else h       # [B,1,V] | [B,1,E]
        return (head, *presents, *queries, *self.lookahead(h, position_ids, d))

    def lookahead(self, h: Tensor, position_ids: Tensor, d: Dims) -> list[Tensor]:
        """The queries [B,H,D] of `next_layers` as if each took `h` [B,1,E] as its input."""
        if not self.next_layers:
            return []
        cos, sin = self.rope(position_ids, h.dtype)                           # [B,1,1,D]
        out = []
        for layer in self.next_layers:
            x = self.norm(h, f"layers.{layer}.input_norm.weight")
            q = self.linear(x, f"layers.{layer}.qkv")[..., : d.heads * d.head_dim]  # the fused weight, q's columns
            out.append(self.rotate(q.reshape(-1, d.heads, d.head_dim), cos.squeeze(1), sin.squeeze(1)))
        return out


def rotate_half_matrix(head_dim: int) -> Tensor:
    """R with x @ R == cat(-x[half:], x[:half]) (HF's rotate_half)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r
