"""The exportable forward shared by every Llama-family adapter.

`DecoderGraph` re-implements the decoder with the weights taken from a Hugging Face model, in
the shape of the kvtrt graph contract (README, "The graph contract"):

inputs   input_ids [B,S] int64, position_ids [B,S] int64, past_mask [B,P] int64 (1 = live slot),
         prefill only: score_queries [n] int64 (rows 0..S-1 of the chunk whose attention forms
         `score`), past_key.{l} / past_value.{l} [B,Hkv,P,D] (keys already rotated)
outputs  logits [B,1,V] (last new token), key.{l} / value.{l} [B,Hkv,S,D] (new tokens only),
         query.{l} [B,H,D] (last new token, rotated), score.{l} [B,Hkv,P+S] (attention mass per
         key from the `score_queries` rows - decode: its one query - averaged over them and over
         the query heads of a KV group)

The runtime asks for the last `score_window` rows on the last prefill chunk (SnapKV's observation
window) and for one row on the others, whose score it discards: recomputing 32 rows beside the
fused attention was 8.6% of a 512-token chunk at P = 7168.

Choices that the measurements in ARCHITECTURE.md motivated:
- GQA without repeating K/V: queries are regrouped to [B,Hkv,group*S,D].
- Past and new keys are scored separately and only the small score matrices are concatenated,
  so the cache is never copied inside the graph.
- `decode=True` builds the S=1 variant that scores past keys as one broadcast GEMV per query head
  ([B,Hkv,1,P,D] @ [B,Hkv,g,D,1]): measured at P=7680 on 30 layers, 15.7 ms against 28 ms for
  K @ q^T (GEMM with N=group pads to 16 columns) and 62 ms for q @ K^T (packs K every call).
- RMSNorm as w * (x / sqrt(mean(x^2) + eps)), which ORT fuses.
- Few, large ops per layer (ORT pays a few microseconds per node on every decode step): fused
  QKV and gate/up projections, q and k rotated together, rotate_half as a MatMul, constant
  reshapes in the decode graph. The query is pre-scaled by 1/sqrt(head_dim): `query.{l}` is the
  rotated query times head_dim**-0.5 (rankings and cosines are unaffected).
- Prefill concatenates past and new K/V (small next to its [gS, P+S] score matrix); decode never
  does (scores are tiny there, the cache is not). With `attention="gqa"` the prefill attention is
  ORT's fused GroupQueryAttention instead (see `GroupQueryAttention`).
- `shared_cache=True` (with `attention="gqa"`) builds the in-place variants `prefill_shared` and
  `decode_shared`: ORT's GroupQueryAttention reads the cache and writes the new tokens' K/V into
  the same buffer (past and present bound to one tensor). Their contract: inputs `input_ids`,
  `position_ids`, `past_mask` [B,C] (the whole buffer; the slots being written count as live),
  prefill only `score_queries`, `write_slot` int64 scalar (the first slot the new K/V go to;
  every sequence of a batch writes the same slots, as the runtime right-aligns them),
  `past_key.{l}` / `past_value.{l}` [B,Hkv,C,D]; outputs `logits`, `present_key.{l}` /
  `present_value.{l}` [B,Hkv,C,D] (the same buffers, the new slots written), `query.{l}` and,
  prefill only, `score.{l}` [B,Hkv,write_slot+S] (over the live prefix). No `key`/`value`
  outputs. FreeKV's views decode with it too: each view has one extra slot at its end, the
  `write_slot`, where the step's K/V land before the runtime files them. Measured with inputs
  bound (SmolLM2 fp32, 2 threads): 1.5-3 ms less per decode step than the plain-op decode graph
  at 512-7680 tokens.
- Weights are stored pre-transposed ([in, out]) so every projection is a plain MatMul on a named
  initializer; a tied embedding is stored once, as the lm_head matrix, and looked up by column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


ATTENTION = ("ops", "gqa")


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
                 rope_scaling: float = 1.0, decode: bool = False,
                 attention: str = "ops", shared_cache: bool = False):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}; use one of {', '.join(ATTENTION)}")
        if shared_cache and attention != "gqa":
            raise ValueError("shared_cache needs attention='gqa'")
        self.arch = arch
        self.decode = decode
        self.shared_cache = shared_cache
        self.gqa = attention == "gqa" and (not decode or shared_cache)
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
        """cos and sin [B,S,1,D] for the positions (HF's rotary, incl. its attention scaling)."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B,S,D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x * cos + rotate_half(x) * sin, with rotate_half as one MatMul by a signed permutation."""
        return x * cos + (x @ self.w("rope.rotate_half")) * sin

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_mask: Tensor, *rest: Tensor):
        if self.shared_cache:
            if self.decode:
                return self.forward_shared(input_ids, position_ids, past_mask, None, rest[0], rest[1:])
            return self.forward_shared(input_ids, position_ids, past_mask, rest[0], rest[1], rest[2:])
        score_queries, past = (None, rest) if self.decode else (rest[0], rest[1:])
        a = self.arch
        H, Hkv, D, g = a.n_heads, a.n_kv_heads, a.head_dim, a.group
        table = self.w("lm_head.weight_t")  # [hidden, V]
        if a.tie_embeddings:
            h = table.index_select(1, input_ids.reshape(-1)).transpose(0, 1)
            h = h.reshape(input_ids.shape[0], -1, a.hidden_size) if not self.decode else h.reshape(-1, 1, a.hidden_size)
        else:
            h = self.w("embed.weight")[input_ids]
        dtype = h.dtype
        cos, sin = self.rope(position_ids, dtype)
        neg_inf = torch.tensor(float("-inf"), dtype=dtype)
        zero = torch.tensor(0.0, dtype=dtype)
        past_bias = torch.where(past_mask.unsqueeze(1).unsqueeze(1) != 0, zero, neg_inf)  # [B,1,1,P]
        if not self.decode:
            # causal among the new tokens by absolute position, after the past: [B,1,S,P+S]
            B, S = input_ids.shape[0], input_ids.shape[1]
            allowed = position_ids.unsqueeze(1) <= position_ids.unsqueeze(2)  # [B,S(q),S(k)]
            new_bias = torch.where(allowed, zero, neg_inf).unsqueeze(1)  # [B,1,S,S]
            bias = torch.cat((past_bias.expand(-1, 1, S, -1), new_bias), dim=-1)
            if self.gqa:  # the fused op reads `bias`; the score rows need it for the last w queries, per group
                score_bias = _tile_group(bias.index_select(2, score_queries), g)  # [B,1,g*n,P+S]
                lengths = AttentionLengths.apply(input_ids, past_mask, None)
            else:
                bias = _tile_group(bias, g)  # [B,1,gS,P+S]
        outputs_kv, outputs_q, outputs_s = [], [], []
        n_past = past_mask.shape[1]  # read once: a per-layer shape lookup costs ORT three nodes a layer
        for layer in range(a.n_layers):
            p = f"layers.{layer}."
            past_k, past_v = past[2 * layer], past[2 * layer + 1]
            x = self.rms_norm(h, self.w(p + "input_norm.weight"))
            qk, v = self.linear(x, p + "qkv").split([(H + Hkv) * D, Hkv * D], dim=-1)
            if self.decode:
                qk = self.rotate(qk.reshape(-1, H + Hkv, D), cos.squeeze(1), sin.squeeze(1))  # [B,H+Hkv,D]
                q, k = qk.split([H, Hkv], dim=1)
                query = q.reshape(-1, Hkv, g, D)  # pre-scaled (see DecoderGraph docs)
                k = k.unsqueeze(2)  # [B,Hkv,1,D]
                v = v.reshape(-1, Hkv, 1, D)
                # one GEMV per query head over its KV head's keys: [B,Hkv,1,P,D] @ [B,Hkv,g,D,1]
                s_past = torch.matmul(past_k.unsqueeze(2), query.unsqueeze(-1)).squeeze(-1)  # [B,Hkv,g,P]
                s_new = torch.matmul(query, k.transpose(2, 3))  # [B,Hkv,g,1]
                probs = torch.softmax(torch.cat((s_past + past_bias, s_new), dim=-1), dim=-1)
                attn = torch.matmul(probs[..., :n_past], past_v) + torch.matmul(probs[..., n_past:], v)
                attn = attn.reshape(-1, 1, H * D)
                outputs_s.append(_fp32(probs.mean(dim=2)))
                outputs_q.append(q)
            else:
                qk = self.rotate(qk.reshape(B, S, H + Hkv, D), cos, sin)
                q, k = qk.split([H, Hkv], dim=2)
                outputs_q.append(q[:, -1])
                if self.gqa:
                    attn, keys, _ = GroupQueryAttention.apply(q.reshape(B, S, H * D), k.reshape(B, S, Hkv * D), v,
                                                              past_k, past_v, bias, *lengths, H, Hkv)
                    k, v = k.transpose(1, 2), v.reshape(B, S, Hkv, D).transpose(1, 2)  # [B,Hkv,S,D]
                    outputs_s.append(_row_scores(q.index_select(1, score_queries), keys, score_bias))
                else:
                    q = q.reshape(B, S, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * S, D)
                    k = k.transpose(1, 2)  # [B,Hkv,S,D]
                    v = v.reshape(B, S, Hkv, D).transpose(1, 2)
                    keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
                    probs = torch.softmax(torch.matmul(q, keys.transpose(2, 3)) + bias, dim=-1)  # [B,Hkv,gS,P+S]
                    attn = torch.matmul(probs, values).reshape(B, Hkv, g, S, D).permute(0, 3, 1, 2, 4)
                    attn = attn.reshape(B, S, H * D)
                    last = probs.reshape(B, Hkv, g, S, -1).index_select(3, score_queries)
                    outputs_s.append(_fp32(last.mean(dim=(2, 3))))
            outputs_kv += [k, v]
            h = h + self.linear(attn, p + "o")
            x = self.rms_norm(h, self.w(p + "post_norm.weight"))
            gate, up = self.linear(x, p + "gate_up").split([a.intermediate_size] * 2, dim=-1)  # one Split node
            h = h + self.linear(torch.nn.functional.silu(gate) * up, p + "down")
        h = self.rms_norm(h[:, -1:, :], self.w("norm.weight"))
        logits = _fp32(h @ table)
        return (logits, *outputs_kv, *outputs_q, *outputs_s)

    def forward_shared(self, input_ids: Tensor, position_ids: Tensor, past_mask: Tensor, score_queries: Tensor | None,
                       write_slot: Tensor, past: tuple[Tensor, ...]):
        """The `shared_cache` variants (see module docstring): a decode step (logits and the buffers)
        or a prefill chunk (also query and score), writing the new K/V into the shared buffers."""
        a = self.arch
        H, Hkv, D, g = a.n_heads, a.n_kv_heads, a.head_dim, a.group
        B, S = (-1, 1) if self.decode else (input_ids.shape[0], input_ids.shape[1])
        table = self.w("lm_head.weight_t")
        if a.tie_embeddings:
            h = table.index_select(1, input_ids.reshape(-1)).transpose(0, 1).reshape(B, S, a.hidden_size)
        else:
            h = self.w("embed.weight")[input_ids]
        cos, sin = self.rope(position_ids, h.dtype)  # [B,S,1,D]
        # q, k and v heads rotated in one go (v by the identity: cos 1, sin 0, exact), so the packed
        # projection goes to the fused op without a Split or Concat: [B,S,H+2Hkv,D]
        cos = torch.cat((cos.expand(-1, -1, H + Hkv, -1), torch.ones_like(cos).expand(-1, -1, Hkv, -1)), 2)
        sin = torch.cat((sin.expand(-1, -1, H + Hkv, -1), torch.zeros_like(sin).expand(-1, -1, Hkv, -1)), 2)
        lengths = AttentionLengths.apply(input_ids, past_mask, write_slot)
        bias = ChunkBias.apply(past_mask, lengths[1], input_ids, h)  # [B,1,S,total]: live slots
        if not self.decode:  # score rows: live slots, causal by slot within the chunk, per group
            rows_bias = bias.index_select(2, score_queries) + CausalRows.apply(score_queries, write_slot, lengths[1], h)
            score_bias = _tile_group(rows_bias, g)  # [B,1,g*n,total]
        presents, queries, scores = [], [], []
        x = self.rms_norm(h, self.w("layers.0.input_norm.weight"))
        for layer in range(a.n_layers):
            p = f"layers.{layer}."
            qkv = self.rotate(self.linear(x, p + "qkv").reshape(B, S, H + 2 * Hkv, D), cos, sin)
            attn, keys, values = SharedCacheAttention.apply(qkv.reshape(B, S, (H + 2 * Hkv) * D), past[2 * layer],
                                                            past[2 * layer + 1], bias, *lengths, H, Hkv)
            presents += [keys, values]
            queries.append(qkv[:, -1, :H])
            if not self.decode:  # over the live prefix [0, total) of the buffer
                q_rows = qkv.index_select(1, score_queries)[:, :, :H]
                scores.append(_row_scores(q_rows, LeadingSlots.apply(keys, lengths[1]), score_bias))
            x, h = ResidualRMSNorm.apply(self.linear(attn, p + "o"), h, self.w(p + "post_norm.weight"), a.rms_eps)
            gate, up = self.linear(x, p + "gate_up").split([a.intermediate_size] * 2, dim=-1)
            following = f"layers.{layer + 1}.input_norm.weight" if layer + 1 < a.n_layers else "norm.weight"
            x, h = ResidualRMSNorm.apply(self.linear(torch.nn.functional.silu(gate) * up, p + "down"), h,
                                         self.w(following), a.rms_eps)
        if self.decode:
            return (_fp32(x @ table), *presents, *queries)
        return (_fp32(x[:, -1:] @ table), *presents, *queries, *scores)


def _row_scores(q_rows: Tensor, keys: Tensor, bias: Tensor) -> Tensor:
    """`score` beside a fused attention op: the attention mass per key [B,Hkv,T] of the chosen
    query rows q_rows [B,n,H,D] over keys [B,Hkv,T,D] with bias [B,1,g*n,T] (head-major rows,
    see `_tile_group`), averaged over the rows and the query heads of each KV group. It is n/S of
    the op's work; the runtime asks for one row except on a prompt's last chunk."""
    b, _, h, d = q_rows.shape
    hkv = keys.shape[1]
    q = q_rows.reshape(b, -1, hkv, h // hkv, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, -1, d)  # [B,Hkv,g*n,D]
    return _fp32(torch.softmax(torch.matmul(q, keys.transpose(2, 3)) + bias, dim=-1).mean(dim=2))


def _tile_group(bias: Tensor, group: int) -> Tensor:
    """[B,1,S,T] -> [B,1,group*S,T]: the rows of every query head of a KV group, head-major."""
    return bias.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(2, 3)


class GroupQueryAttention(torch.autograd.Function):
    """Prefill attention as ONNX Runtime's fused `com.microsoft::GroupQueryAttention` (CPU/CUDA).

    In torch (tracing, the validation reference) it is the plain computation; exported, it is
    one node per layer that never materialises the [B,Hkv,gS,P+S] score matrix in memory
    (`kvtrt export --attention gqa`, the fp32 default; TensorRT needs `ops`).
    q [B,S,H*D] (rotated, pre-scaled: scale 1), k/v [B,S,Hkv*D], past [B,Hkv,P,D], bias
    [B,1,S,P+S] (past mask + causal by position). Returns attn [B,S,H*D] and the concatenated
    keys/values [B,Hkv,P+S,D]. The op's own causal mask (by slot) agrees with the position mask
    for a chunk whose positions follow the past's, which is how the runtime prefills.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
        b, s, _ = q.shape
        d, g = past_k.shape[-1], n_heads // n_kv_heads
        keys = torch.cat((past_k, k.reshape(b, s, n_kv_heads, d).transpose(1, 2)), dim=2)
        values = torch.cat((past_v, v.reshape(b, s, n_kv_heads, d).transpose(1, 2)), dim=2)
        qh = q.reshape(b, s, n_heads, d).transpose(1, 2)  # [B,H,S,D]
        scores = qh @ keys.repeat_interleave(g, dim=1).transpose(2, 3) + bias
        attn = torch.softmax(scores, dim=-1) @ values.repeat_interleave(g, dim=1)
        return attn.transpose(1, 2).reshape(b, s, n_heads * d), keys, values

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
        return _gqa_node(g, q, k, v, past_k, past_v, bias, seqlens, total, query_lens, n_heads, n_kv_heads)


class SharedCacheAttention(torch.autograd.Function):
    """Attention over a buffer that is both past and present (ORT GroupQueryAttention with
    `past_key` and `present_key` bound to one tensor: the op writes the S new K/V at slots
    [write_slot, write_slot + S) and row i attends over slots [0, write_slot + i], causal by slot;
    nothing else of the cache is copied).

    qkv [B,S,(H+2Hkv)*D] (q and k rotated, q pre-scaled), past [B,Hkv,C,D], bias [B,1,S,total]
    (see `ChunkBias`), lengths from `AttentionLengths`. Returns attn [B,S,H*D] and the buffers with
    the new slots written. (Run unshared, e.g. by Polygraphy, the op returns the same values in fresh
    tensors when write_slot + S = C.)
    """

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
        b, s, d = qkv.shape[0], qkv.shape[1], past_k.shape[-1]
        q, k, v = qkv.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], dim=-1)
        t = int(total)
        start = t - s  # the chunk's first slot
        keys, values = past_k.clone(), past_v.clone()
        keys[:, :, start:t] = k.reshape(b, s, n_kv_heads, d).transpose(1, 2)
        values[:, :, start:t] = v.reshape(b, s, n_kv_heads, d).transpose(1, 2)
        g = n_heads // n_kv_heads
        qh = q.reshape(b, s, n_heads, d).transpose(1, 2)  # [B,H,S,D]
        scores = qh @ keys[:, :, :t].repeat_interleave(g, dim=1).transpose(2, 3) + bias
        later = torch.arange(t)[None, :] > (start + torch.arange(s))[:, None]  # the op's own causal mask, by slot
        probs = torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1)
        attn = probs @ values[:, :, :t].repeat_interleave(g, dim=1)
        return attn.transpose(1, 2).reshape(b, s, n_heads * d), keys, values

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
        return _gqa_node(g, qkv, None, None, past_k, past_v, bias, seqlens, total, query_lens, n_heads, n_kv_heads)


class ResidualRMSNorm(torch.autograd.Function):
    """h = residual + x and RMSNorm(h) * weight in one node: ORT's
    `com.microsoft::SkipSimplifiedLayerNormalization` (CPU/CUDA; the shared-cache decode graph, which
    is ORT-only anyway). Returns (normed, h). Standard ops would be an Add and the norm, per
    residual: 60 more nodes a step for SmolLM2."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float):
        h = residual + x
        hf = h.float()
        return weight * (hf / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h

    @staticmethod
    def symbolic(g, x, residual, weight, eps: float):
        outs = g.op("kvtrt::SkipSimplifiedLayerNormalization", x, residual, weight, epsilon_f=eps, outputs=4)
        for out in outs:
            out.setType(x.type())
        return outs[0], outs[3]


class AttentionLengths(torch.autograd.Function):
    """GroupQueryAttention's length inputs, once per graph (per layer they cost ORT ~6 nodes each):
    seqlens_k [B] int32 (the last new token's slot), total_sequence_length int32 scalar and
    query_seqlens [B] int32 (S: every row of a chunk is a real token, which lets batch > 1 chunks
    have a past). `write_slot` None: the chunk follows the P past slots; shared cache: the chunk
    goes to slots [write_slot, write_slot + S)."""

    @staticmethod
    def forward(ctx, input_ids, past_mask, write_slot):
        b, s = input_ids.shape
        total = (int(write_slot) if write_slot is not None else past_mask.shape[1]) + s
        return (torch.full((b,), total - 1, dtype=torch.int32), torch.tensor(total, dtype=torch.int32),
                torch.full((b,), s, dtype=torch.int32))

    @staticmethod
    def symbolic(g, input_ids, past_mask, write_slot):
        shape = g.op("Shape", input_ids)
        batch = g.op("Gather", shape, _const(g, [0]), axis_i=0)
        new_len = g.op("Cast", g.op("Gather", shape, _const(g, 1), axis_i=0), to_i=6)
        if write_slot is None or write_slot.node().mustBeNone():
            past_len = g.op("Cast", g.op("Gather", g.op("Shape", past_mask), _const(g, 1), axis_i=0), to_i=6)
            total = g.op("Add", past_len, new_len)
        else:
            total = g.op("Add", g.op("Cast", write_slot, to_i=6), new_len)
        seqlens = g.op("Expand", g.op("Sub", total, _const(g, 1, torch.int32)), batch)
        query_lens = g.op("Expand", new_len, batch)
        for out, sizes in ((seqlens, [None]), (total, []), (query_lens, [None])):
            out.setType(out.type().with_dtype(torch.int32).with_sizes(sizes))
        return seqlens, total, query_lens


class ChunkBias(torch.autograd.Function):
    """Additive attention bias [B,1,S,total] from a [B,C] slot mask: 0 for live slots, -inf for
    dead ones, over the slots [0, total) a shared-cache call attends, the same for every row (the
    fused op adds causality within the chunk). `input_ids` gives S, `like` the dtype."""

    @staticmethod
    def forward(ctx, mask, total, input_ids, like):
        live = mask[:, : int(total)] != 0
        zero, neg_inf = torch.zeros((), dtype=like.dtype), torch.full((), float("-inf"), dtype=like.dtype)
        return torch.where(live, zero, neg_inf)[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)

    @staticmethod
    def symbolic(g, mask, total, input_ids, like):
        end = g.op("Unsqueeze", g.op("Cast", total, to_i=7), _const(g, [0]))
        live = g.op("Slice", mask, _const(g, [0]), end, _const(g, [1]))
        bias = g.op("Where", g.op("Cast", live, to_i=9), *_zero_and_neg_inf(g, like))  # Cast to bool: nonzero is live
        bias = g.op("Unsqueeze", bias, _const(g, [1, 2]))  # [B,1,1,total]
        rows = g.op("Gather", g.op("Shape", input_ids), _const(g, [1]), axis_i=0)
        shape = g.op("Concat", _const(g, [1, 1]), rows, _const(g, [1]), axis_i=0)
        out = g.op("Expand", bias, shape)
        out.setType(like.type().with_sizes([None, 1, None, None]))
        return out


class CausalRows(torch.autograd.Function):
    """[1,1,n,total] additive mask for the score rows of a shared-cache chunk: row r (a chunk row,
    at slot write_slot + r) sees slots up to its own."""

    @staticmethod
    def forward(ctx, rows, write_slot, total, like):
        later = torch.arange(int(total))[None, :] > (int(write_slot) + rows)[:, None]
        return torch.zeros(later.shape, dtype=like.dtype).masked_fill(later, float("-inf"))[None, None]

    @staticmethod
    def symbolic(g, rows, write_slot, total, like):
        slots = g.op("Range", _const(g, 0), g.op("Cast", total, to_i=7), _const(g, 1))  # [total]
        own = g.op("Unsqueeze", g.op("Add", rows, write_slot), _const(g, [1]))  # [n,1]
        zero, neg_inf = _zero_and_neg_inf(g, like)
        out = g.op("Where", g.op("Greater", g.op("Unsqueeze", slots, _const(g, [0])), own), neg_inf, zero)
        out = g.op("Unsqueeze", out, _const(g, [0, 1]))
        out.setType(like.type().with_sizes([1, 1, None, None]))
        return out


class LeadingSlots(torch.autograd.Function):
    """x[:, :, :total] for a total known only at run time (one Slice node)."""

    @staticmethod
    def forward(ctx, x, total):
        return x[:, :, : int(total)].clone()

    @staticmethod
    def symbolic(g, x, total):
        end = g.op("Unsqueeze", g.op("Cast", total, to_i=7), _const(g, [0]))
        out = g.op("Slice", x, _const(g, [0]), end, _const(g, [2]))
        out.setType(x.type().with_sizes([None] * x.type().dim()))
        return out


def _zero_and_neg_inf(g, like):
    dtype = _SCALAR_DTYPES[like.type().scalarType()]
    return (g.op("Constant", value_t=torch.zeros((), dtype=dtype)),
            g.op("Constant", value_t=torch.full((), float("-inf"), dtype=dtype)))


_SCALAR_DTYPES = {"Float": torch.float32, "Half": torch.float16}


def _const(g, value, dtype=torch.long):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _gqa_node(g, q, k, v, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
    """A `kvtrt::GroupQueryAttention` placeholder; `export.onnx_export` renames it to com.microsoft
    with the op's optional inputs (lengths from `AttentionLengths`). k and v None: q is packed QKV."""
    kv = [] if k is None else [k, v]
    outs = g.op("kvtrt::GroupQueryAttention", q, *kv, past_k, past_v, seqlens, total, bias, query_lens,
                num_heads_i=n_heads, kv_num_heads_i=n_kv_heads, scale_f=1.0, outputs=3)
    for out, like in zip(outs, (q, past_k, past_v)):  # rank and dtype for the exporter's shape inference
        out.setType(like.type().with_sizes([None] * like.type().dim()))
    return outs


def _fp32(x: Tensor) -> Tensor:
    """x as float32; no node at all when it already is (the exporter would emit a Cast copy)."""
    return x if x.dtype == torch.float32 else x.float()


def rotate_half_matrix(head_dim: int) -> Tensor:
    """R with x @ R == cat(-x[half:], x[:half]) (HF's rotate_half)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def input_names(n_layers: int, variant: str = "prefill") -> list[str]:
    """Graph input names of `variant` ("prefill", "decode", "prefill_shared", "decode_shared")."""
    names = ["input_ids", "position_ids", "past_mask"]
    names += {"prefill": ["score_queries"], "prefill_shared": ["score_queries", "write_slot"],
              "decode_shared": ["write_slot"]}.get(variant, [])
    for layer in range(n_layers):
        names += [f"past_key.{layer}", f"past_value.{layer}"]
    return names


def output_names(n_layers: int, variant: str = "prefill") -> list[str]:
    """Graph output names of `variant` ("prefill" and "decode" share them; the in-place variants
    have `present_*` instead of `key`/`value`, and only prefill_shared a `score`)."""
    if variant.endswith("_shared"):
        names = ["logits"] + [f"present_{kind}.{layer}" for layer in range(n_layers) for kind in ("key", "value")]
        names += [f"query.{layer}" for layer in range(n_layers)]
        if variant == "prefill_shared":
            names += [f"score.{layer}" for layer in range(n_layers)]
        return names
    names = ["logits"]
    for layer in range(n_layers):
        names += [f"key.{layer}", f"value.{layer}"]
    names += [f"query.{layer}" for layer in range(n_layers)]
    names += [f"score.{layer}" for layer in range(n_layers)]
    return names
