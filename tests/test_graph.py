"""The graph contract against Hugging Face: logits, query and score outputs (tiny random models)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

FAMILIES = ["llama", "mistral", "qwen2"]


def _session(directory, variant):
    return ort.InferenceSession(str(directory / f"{variant}.onnx"), providers=["CPUExecutionProvider"])


def _run(session, ids, positions, mask, past):
    feeds = {"input_ids": np.asarray(ids, np.int64), "position_ids": np.asarray(positions, np.int64),
             "past_mask": np.asarray(mask, np.int64)}
    for layer, (k, v) in enumerate(past):
        feeds[f"past_key.{layer}"], feeds[f"past_value.{layer}"] = k, v
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _empty_past(model, batch=1):
    c = model.config
    shape = (batch, c.num_key_value_heads, 0, c.hidden_size // c.num_attention_heads)
    return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.num_hidden_layers)]


def _append(past, out):
    return [(np.concatenate([k, out[f"key.{i}"]], 2), np.concatenate([v, out[f"value.{i}"]], 2))
            for i, (k, v) in enumerate(past)]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_hf(tiny_exports, family):
    model, _, directory = tiny_exports[family]
    prefill, decode = _session(directory, "prefill"), _session(directory, "decode")
    ids = torch.randint(5, 200, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    out = _run(prefill, ids[:, :13], [list(range(13))], np.zeros((1, 0)), _empty_past(model))
    np.testing.assert_allclose(out["logits"][0, 0], ref[12], atol=1e-4, rtol=0)
    past = _append(_empty_past(model), out)
    # a second prefill chunk with past, then decode steps one token at a time
    out = _run(prefill, ids[:, 13:18], [list(range(13, 18))], np.ones((1, 13)), past)
    np.testing.assert_allclose(out["logits"][0, 0], ref[17], atol=1e-4, rtol=0)
    past = _append(past, out)
    for t in range(18, 24):
        out = _run(decode, ids[:, t:t + 1], [[t]], np.ones((1, t)), past)
        np.testing.assert_allclose(out["logits"][0, 0], ref[t], atol=1e-4, rtol=0)
        past = _append(past, out)


def test_dead_slots_are_ignored(tiny_llama):
    """Masked past slots (garbage inside) change nothing: the runtime may keep holes."""
    model, _, directory = tiny_llama
    decode = _session(directory, "decode")
    ids = torch.randint(5, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[0, -1].numpy()
    out = _run(_session(directory, "prefill"), ids[:, :8], [list(range(8))], np.zeros((1, 0)), _empty_past(model))
    past = _append(_empty_past(model), out)
    rng = np.random.default_rng(0)
    holey = [(np.concatenate([rng.normal(size=(1, 2, 3, 16)).astype(np.float32), k], 2),
              np.concatenate([rng.normal(size=(1, 2, 3, 16)).astype(np.float32), v], 2)) for k, v in past]
    out = _run(decode, ids[:, 8:9], [[8]], [[0, 0, 0] + [1] * 8], holey)
    np.testing.assert_allclose(out["logits"][0, 0], ref, atol=1e-4, rtol=0)


def _hf_queries_and_attn(model, ids):
    """Rotated queries of every layer and HF's attention probabilities (eager attention)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model.config._attn_implementation = "eager"
    captured = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(idx, o))
             for idx, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True)
            positions = torch.arange(ids.shape[1])[None]
            cos, sin = model.model.rotary_emb(captured[0], positions)
    finally:
        for h in hooks:
            h.remove()
        model.config._attn_implementation = "sdpa"
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    queries = []
    for idx in range(c.num_hidden_layers):
        q = captured[idx].view(1, ids.shape[1], c.num_attention_heads, head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        queries.append(q)
    return queries, out.attentions


@pytest.mark.parametrize("family", FAMILIES)
def test_query_and_score_match_hf(tiny_exports, family):
    model, _, directory = tiny_exports[family]
    c = model.config
    group, head_dim, window = c.num_attention_heads // c.num_key_value_heads, c.hidden_size // c.num_attention_heads, 4
    ids = torch.randint(5, 200, (1, 15), generator=torch.Generator().manual_seed(3))
    queries, attentions = _hf_queries_and_attn(model, ids)
    prefill, decode = _session(directory, "prefill"), _session(directory, "decode")
    out = _run(prefill, ids[:, :10], [list(range(10))], np.zeros((1, 0)), _empty_past(model))
    past = _append(_empty_past(model), out)
    out2 = _run(prefill, ids[:, 10:14], [list(range(10, 14))], np.ones((1, 10)), past)
    past = _append(past, out2)
    out3 = _run(decode, ids[:, 14:15], [[14]], np.ones((1, 14)), past)
    for layer in range(c.num_hidden_layers):
        attn = attentions[layer][0].numpy()  # [H, S, S]
        for result, end in ((out, 10), (out2, 14), (out3, 15)):
            q_ref = queries[layer][0, :, end - 1].numpy() * head_dim ** -0.5
            np.testing.assert_allclose(result[f"query.{layer}"][0], q_ref, atol=1e-4, rtol=1e-4)
        # score: mass from the last `window` queries of the call, averaged over each KV group's heads
        for result, start, end in ((out, 0, 10), (out2, 10, 14)):
            rows = attn[:, max(start, end - window):end, :end]  # queries of this call only
            ref = rows.reshape(c.num_key_value_heads, group, rows.shape[1], end).mean(axis=(1, 2))
            np.testing.assert_allclose(result[f"score.{layer}"][0], ref, atol=1e-5)
        ref = attn[:, 14, :15].reshape(c.num_key_value_heads, group, 15).mean(axis=1)
        np.testing.assert_allclose(out3[f"score.{layer}"][0], ref, atol=1e-5)


def test_fused_and_standard_op_prefill_agree(tiny_llama, tmp_path):
    """`--prefill-attention gqa` (com.microsoft GroupQueryAttention, the fp32 default) and `ops`
    (standard ONNX, for TensorRT) give the same outputs, for a batch of two with a past that has a
    dead slot holding garbage and a chunk shorter than the score window on one call, longer on the other."""
    from tiny import tiny_tokenizer

    from kvtrt.export import export_model
    from kvtrt.manifest import Manifest

    model, _, fused_dir = tiny_llama
    ops_dir = tmp_path / "ops"
    score_window = Manifest.load(fused_dir).score_window
    export_model((model, tiny_tokenizer()), ops_dir, prefill_attention="ops", score_window=score_window,
                 progress=False)
    def op_types(directory):
        return {n.op_type for n in onnx.load(str(directory / "prefill.onnx"), load_external_data=False).graph.node}

    assert "GroupQueryAttention" in op_types(fused_dir) and "GroupQueryAttention" not in op_types(ops_dir)
    fused, ops = _session(fused_dir, "prefill"), _session(ops_dir, "prefill")
    rng = np.random.default_rng(0)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    for past_len, new in ((9, 3), (6, score_window + 5)):
        past = [(rng.standard_normal((2, c.num_key_value_heads, past_len, head_dim)).astype(np.float32),
                 rng.standard_normal((2, c.num_key_value_heads, past_len, head_dim)).astype(np.float32))
                for _ in range(c.num_hidden_layers)]
        mask = np.ones((2, past_len), np.int64)
        mask[1, 2] = 0
        for k, v in past:
            k[1, :, 2], v[1, :, 2] = 1e4, -1e4  # garbage in the dead slot
        ids = rng.integers(5, 200, (2, new))
        positions = np.tile(np.arange(past_len, past_len + new), (2, 1))
        a, b = _run(fused, ids, positions, mask, past), _run(ops, ids, positions, mask, past)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=2e-5, rtol=1e-4, err_msg=f"{name} P={past_len} S={new}")
