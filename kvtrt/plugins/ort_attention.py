"""Attention in standard ONNX ops (what TensorRT parses) and as ONNX Runtime's fused
`com.microsoft::GroupQueryAttention` (CPU/CUDA), which never writes the score matrix to memory.

- prefill, standard ops: `grouped_attention` (queries regrouped to [B,Hkv,g*S,D], past and new
  K/V concatenated); fused: `GroupQueryAttention` (`kvtrt export --attention gqa`, the fp32 default).
- decode, standard ops: `gemv_attention` (past keys scored as one broadcast GEMV per query head,
  the cache never copied); in place: `SharedCacheAttention` (the op writes the new K/V into the
  bound store; the `prefill_shared` and `decode_shared` graphs).
- `row_scores`: the `score` output beside a fused op, for the chosen query rows only.

The fused ops trace as `kvtrt::GroupQueryAttention` placeholders; `contrib_inputs` gives the
com.microsoft node's input layout when the exporter renames them (`kvtrt.plugins.to_contrib_ops`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .common import fp32


class Dims(NamedTuple):
    """The sizes attention reshapes by: batch and new tokens (traced values or ints), heads, KV
    heads and head size (ints); and whether `score` is per query head (`[B,H,T]`) or averaged over
    each KV group's query heads (`[B,Hkv,T]`, exports before `score_heads`)."""

    batch: object
    new: object
    heads: int
    kv_heads: int
    head_dim: int
    query_scores: bool = True

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


class PrefillMasks(NamedTuple):
    """What prefill attention reads besides q, k and v: the additive bias [B,1,S,P+S] (live past
    slots, causal by position; tiled per group, [B,1,gS,P+S], for standard ops), the score rows,
    and for the fused op their own bias [B,1,g*n,P+S] and the op's length inputs."""

    bias: Tensor
    score_queries: Tensor
    score_bias: Tensor | None = None
    lengths: tuple | None = None


def attention_mass(probs: Tensor, query_scores: bool) -> Tensor:
    """`score` from the score rows' probabilities [B,Hkv,g,n,T]: the mean over the n rows, per query
    head [B,H,T] (head h = kv * g + i, HF's order) or also over each group's g heads [B,Hkv,T]."""
    mass = probs.mean(dim=3)                                               # [B,Hkv,g,T]
    return fp32(mass.flatten(1, 2) if query_scores else mass.mean(dim=2))


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, masks: PrefillMasks,
                      d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prefill attention in standard ops, GQA without repeating K/V. q [B,S,H,D] (rotated,
    pre-scaled), k [B,S,Hkv,D], v [B,S,Hkv*D]. Returns attn [B,S,H*D], k and v [B,Hkv,S,D] and
    the score [B,H|Hkv,P+S] of the `score_queries` rows (see `attention_mass`)."""
    B, S, Hkv, g, D = d.batch, d.new, d.kv_heads, d.group, d.head_dim
    q = q.reshape(B, S, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * S, D)
    k = k.transpose(1, 2)  # [B,Hkv,S,D]
    v = v.reshape(B, S, Hkv, D).transpose(1, 2)
    keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
    probs = torch.softmax(torch.matmul(q, keys.transpose(2, 3)) + masks.bias, dim=-1)  # [B,Hkv,gS,P+S]
    attn = torch.matmul(probs, values).reshape(B, Hkv, g, S, D).permute(0, 3, 1, 2, 4)
    attn = attn.reshape(B, S, d.heads * D)
    rows = probs.reshape(B, Hkv, g, S, -1).index_select(3, masks.score_queries)  # [B,Hkv,g,n,P+S]
    return attn, k, v, attention_mass(rows, d.query_scores)


def fused_grouped_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, masks: PrefillMasks,
                            d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`grouped_attention` as one GroupQueryAttention node (untiled bias, `lengths` from
    `AttentionLengths`), and the score rows recomputed beside it with their own `score_bias`."""
    B, S, H, Hkv, D = d.batch, d.new, d.heads, d.kv_heads, d.head_dim
    attn, keys, _ = GroupQueryAttention.apply(q.reshape(B, S, H * D), k.reshape(B, S, Hkv * D), v,
                                              past_k, past_v, masks.bias, *masks.lengths, H, Hkv)
    k, v = k.transpose(1, 2), v.reshape(B, S, Hkv, D).transpose(1, 2)  # [B,Hkv,S,D]
    return attn, k, v, row_scores(q.index_select(1, masks.score_queries), keys, masks.score_bias, d.query_scores)


def gemv_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, past_bias: Tensor,
                   n_past, d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode attention (S = 1) in standard ops: past keys scored as one GEMV per query head
    ([B,Hkv,1,P,D] @ [B,Hkv,g,D,1]; at P=7680 on 30 layers 15.7 ms against 28 ms for K @ q^T and
    62 ms for q @ K^T), past and new scored apart so the cache is never concatenated.
    q [B,H,D], k [B,Hkv,D], v [B,1,Hkv*D], past_bias [B,1,1,P]. Returns attn [B,1,H*D], k and v
    [B,Hkv,1,D] and the score [B,H|Hkv,P+1] (see `attention_mass`)."""
    Hkv, g, D = d.kv_heads, d.group, d.head_dim
    query = q.reshape(-1, Hkv, g, D)
    k = k.unsqueeze(2)  # [B,Hkv,1,D]
    v = v.reshape(-1, Hkv, 1, D)
    s_past = torch.matmul(past_k.unsqueeze(2), query.unsqueeze(-1)).squeeze(-1)  # [B,Hkv,g,P]
    s_new = torch.matmul(query, k.transpose(2, 3))  # [B,Hkv,g,1]
    probs = torch.softmax(torch.cat((s_past + past_bias, s_new), dim=-1), dim=-1)
    attn = torch.matmul(probs[..., :n_past], past_v) + torch.matmul(probs[..., n_past:], v)
    return attn.reshape(-1, 1, d.heads * D), k, v, attention_mass(probs.unsqueeze(3), d.query_scores)


def pooled_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, bias: Tensor,
                     d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode attention (S = 1) over one slot pool shared by the KV heads (`decode_heads`): every query
    head scores all P slots with one GEMM, `bias` [B,H,P] (0 on the slots of the head's own KV head,
    -inf elsewhere) keeps its own, and its new token is its KV head's. q [B,H,D], k [B,Hkv,D],
    v [B,1,Hkv*D], past [B,1,P,D]. Returns attn [B,1,H*D], k and v [B,Hkv,1,D] and the score
    [B,H|Hkv,P+1] (see `attention_mass`)."""
    Hkv, g, D = d.kv_heads, d.group, d.head_dim
    query = q.reshape(-1, Hkv, g, D)
    k = k.unsqueeze(2)  # [B,Hkv,1,D]
    v = v.reshape(-1, Hkv, 1, D)
    s_past = torch.matmul(q, past_k.squeeze(1).transpose(1, 2)) + bias     # [B,H,P]
    s_new = torch.matmul(query, k.transpose(2, 3)).reshape(-1, d.heads, 1)  # [B,H,1]: head h's own new token
    probs = torch.softmax(torch.cat((s_past, s_new), dim=-1), dim=-1)        # [B,H,P+1]
    n_past = past_k.shape[2]
    attn = torch.matmul(probs[..., :n_past], past_v.squeeze(1)).reshape(-1, Hkv, g, D)  # [B,Hkv,g,D]
    attn = attn + probs[..., n_past:].reshape(-1, Hkv, g, 1) * v
    mass = probs.reshape(-1, Hkv, g, 1, probs.shape[-1])
    return attn.reshape(-1, 1, d.heads * D), k, v, attention_mass(mass, d.query_scores)


def row_scores(q_rows: Tensor, keys: Tensor, bias: Tensor, query_scores: bool = True) -> Tensor:
    """`score` beside a fused attention op: the attention mass per key [B,H|Hkv,T] (see
    `attention_mass`) of the chosen query rows q_rows [B,n,H,D] over keys [B,Hkv,T,D] with bias
    [B,1,g*n,T] (head-major rows, see `tile_group`), averaged over the rows. It is n/S of the op's
    work; the runtime asks for one row except on a prompt's last chunk."""
    b, n, h, d = q_rows.shape
    hkv = keys.shape[1]
    g = h // hkv
    q = q_rows.reshape(b, -1, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, -1, d)  # [B,Hkv,g*n,D]
    probs = torch.softmax(torch.matmul(q, keys.transpose(2, 3)) + bias, dim=-1)         # [B,Hkv,g*n,T]
    return attention_mass(probs.reshape(b, hkv, g, n, -1), query_scores)


class GroupQueryAttention(torch.autograd.Function):
    """Prefill attention as ONNX Runtime's fused `com.microsoft::GroupQueryAttention` (CPU/CUDA).

    In torch (tracing, the validation reference) it is the plain computation; exported, it is
    one node per layer that never materialises the [B,Hkv,gS,P+S] score matrix in memory.
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
        return gqa_node(g, q, k, v, past_k, past_v, bias, seqlens, total, query_lens, n_heads, n_kv_heads)


class SharedCacheAttention(torch.autograd.Function):
    """Attention over a buffer that is both past and present (ORT GroupQueryAttention with
    `past_key` and `present_key` bound to one tensor: the op writes row b's S new K/V at slots
    [end_b - S, end_b), end_b = seqlens[b] + 1, and its token i attends over slots [0, end_b - S + i],
    causal by slot; nothing else of the cache is copied).

    qkv [B,S,(H+2Hkv)*D] (q and k rotated, q pre-scaled), past [B,Hkv,C,D], bias [B,1,S,total]
    (see `ChunkBias`), lengths from `AttentionLengths` (per row: a decode call's rows may end at
    different slots). Returns attn [B,S,H*D] and the buffers with the new slots written. (Run
    unshared, e.g. by Polygraphy, the op returns the same values in fresh tensors when every row
    ends at C.)
    """

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
        b, s, d = qkv.shape[0], qkv.shape[1], past_k.shape[-1]
        q, k, v = qkv.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], dim=-1)
        t = int(total)
        starts = seqlens.long() + 1 - s  # [B] each row's first new slot
        keys, values = past_k.clone(), past_v.clone()
        for row, start in enumerate(starts.tolist()):
            keys[row, :, start:start + s] = k[row].reshape(s, n_kv_heads, d).transpose(0, 1)
            values[row, :, start:start + s] = v[row].reshape(s, n_kv_heads, d).transpose(0, 1)
        g = n_heads // n_kv_heads
        qh = q.reshape(b, s, n_heads, d).transpose(1, 2)  # [B,H,S,D]
        scores = qh @ keys[:, :, :t].repeat_interleave(g, dim=1).transpose(2, 3) + bias
        own = starts[:, None] + torch.arange(s)[None, :]  # [B,S] each token's slot
        later = torch.arange(t)[None, None, :] > own[:, :, None]  # the op's own causal mask, by slot
        probs = torch.softmax(scores.masked_fill(later[:, None], float("-inf")), dim=-1)
        attn = probs @ values[:, :, :t].repeat_interleave(g, dim=1)
        return attn.transpose(1, 2).reshape(b, s, n_heads * d), keys, values

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
        return gqa_node(g, qkv, None, None, past_k, past_v, bias, seqlens, total, query_lens, n_heads, n_kv_heads)


def gqa_node(g, q, k, v, past_k, past_v, bias, seqlens, total, query_lens, n_heads: int, n_kv_heads: int):
    """A `kvtrt::GroupQueryAttention` placeholder (lengths from `AttentionLengths`); `contrib_inputs`
    gives it the op's optional inputs on export. k and v None: q is packed QKV."""
    kv = [] if k is None else [k, v]
    outs = g.op("kvtrt::GroupQueryAttention", q, *kv, past_k, past_v, seqlens, total, bias, query_lens,
                num_heads_i=n_heads, kv_num_heads_i=n_kv_heads, scale_f=1.0, outputs=3)
    for out, like in zip(outs, (q, past_k, past_v)):  # rank and dtype for the exporter's shape inference
        out.setType(like.type().with_sizes([None] * like.type().dim()))
    return outs


def contrib_inputs(inputs: list[str]) -> list[str]:
    """The com.microsoft GroupQueryAttention inputs from the placeholder's: cos/sin cache,
    position_ids, head_sink, KV scales and qk-norm weights omitted; key and value too when the
    query input is packed QKV."""
    if len(inputs) == 7:  # packed QKV: key and value inputs empty
        q, past_k, past_v, seqlens, total, bias, query_lens = inputs
        k = v = ""
    else:
        q, k, v, past_k, past_v, seqlens, total, bias, query_lens = inputs
    return [q, k, v, past_k, past_v, seqlens, total, "", "", "", bias, *[""] * 5, query_lens]
