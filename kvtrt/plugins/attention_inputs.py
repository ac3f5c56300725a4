"""The inputs of ORT's fused attention that depend on run-time lengths, each one small subgraph.

Traced as plain torch, these would freeze the trace's lengths into constants; as autograd
functions their `symbolic` writes the few standard ONNX ops that compute them per call.
"""

from __future__ import annotations

import torch

from .common import const, zero_and_neg_inf


class AttentionLengths(torch.autograd.Function):
    """GroupQueryAttention's length inputs, once per graph (per layer they cost ORT ~6 nodes each):
    seqlens_k [B] int32 (each row's last new slot), total_sequence_length int32 scalar (the longest
    row's) and query_seqlens [B] int32 (S: every row of a chunk is a real token, which lets batch > 1
    chunks have a past). `write_slot` None: the chunk follows the P past slots; a scalar (shared-cache
    prefill): the chunk goes to slots [write_slot, write_slot + S) of every row; [B] (shared-cache
    decode): row b's token goes to slot write_slot[b] and the row attends [0, write_slot[b]] only, so
    rows of different lengths share a call without attending each other's padding."""

    @staticmethod
    def forward(ctx, input_ids, past_mask, write_slot):
        b, s = input_ids.shape
        if write_slot is None:
            ends = torch.full((b,), past_mask.shape[1] + s)
        else:
            ends = write_slot.reshape(-1).expand(b) + s
        return ((ends - 1).to(torch.int32), ends.max().to(torch.int32), torch.full((b,), s, dtype=torch.int32))

    @staticmethod
    def symbolic(g, input_ids, past_mask, write_slot):
        shape = g.op("Shape", input_ids)
        batch = g.op("Gather", shape, const(g, [0]), axis_i=0)
        new_len = g.op("Cast", g.op("Gather", shape, const(g, 1), axis_i=0), to_i=6)
        if write_slot is None or write_slot.node().mustBeNone():
            past_len = g.op("Cast", g.op("Gather", g.op("Shape", past_mask), const(g, 1), axis_i=0), to_i=6)
            ends = total = g.op("Add", past_len, new_len)
        else:
            ends = g.op("Add", g.op("Cast", write_slot, to_i=6), new_len)  # scalar or [B]
            total = ends if write_slot.type().dim() == 0 else g.op("ReduceMax", ends, keepdims_i=0)
        seqlens = g.op("Expand", g.op("Sub", ends, const(g, 1, torch.int32)), batch)
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
        end = g.op("Unsqueeze", g.op("Cast", total, to_i=7), const(g, [0]))
        live = g.op("Slice", mask, const(g, [0]), end, const(g, [1]))
        bias = g.op("Where", g.op("Cast", live, to_i=9), *zero_and_neg_inf(g, like))  # Cast to bool: nonzero is live
        bias = g.op("Unsqueeze", bias, const(g, [1, 2]))  # [B,1,1,total]
        rows = g.op("Gather", g.op("Shape", input_ids), const(g, [1]), axis_i=0)
        shape = g.op("Concat", const(g, [1, 1]), rows, const(g, [1]), axis_i=0)
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
        slots = g.op("Range", const(g, 0), g.op("Cast", total, to_i=7), const(g, 1))  # [total]
        own = g.op("Unsqueeze", g.op("Add", rows, write_slot), const(g, [1]))  # [n,1]
        zero, neg_inf = zero_and_neg_inf(g, like)
        out = g.op("Where", g.op("Greater", g.op("Unsqueeze", slots, const(g, [0])), own), neg_inf, zero)
        out = g.op("Unsqueeze", out, const(g, [0, 1]))
        out.setType(like.type().with_sizes([1, 1, None, None]))
        return out


class LeadingSlots(torch.autograd.Function):
    """x[:, :, :total] for a total known only at run time (one Slice node)."""

    @staticmethod
    def forward(ctx, x, total):
        return x[:, :, : int(total)].clone()

    @staticmethod
    def symbolic(g, x, total):
        end = g.op("Unsqueeze", g.op("Cast", total, to_i=7), const(g, [0]))
        out = g.op("Slice", x, const(g, [0]), end, const(g, [2]))
        out.setType(x.type().with_sizes([None] * x.type().dim()))
        return out
