"""The graph contract against Hugging Face: logits, query and score outputs (tiny random models)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kvtrt
from kvtrt.contract import GraphVariant
from kvtrt.runtime.kv.spec import KVSpecError

FAMILIES = ["llama", "mistral", "qwen2"]


def _session(directory, variant):
    return ort.InferenceSession(str(directory / GraphVariant(variant).onnx_file), providers=["CPUExecutionProvider"])


def _run(session, ids, positions, mask, past, rows=None):
    """One graph call; a prefill's `score_queries` default to the last 4 rows (the tiny exports' window)."""
    feeds = {"input_ids": np.asarray(ids, np.int64), "position_ids": np.asarray(positions, np.int64),
             "past_mask": np.asarray(mask, np.int64)}
    if "score_queries" in {i.name for i in session.get_inputs()}:
        n = feeds["input_ids"].shape[1]
        feeds["score_queries"] = np.asarray(range(max(0, n - 4), n) if rows is None else rows, np.int64)
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

    model.set_attn_implementation("eager")
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
        model.set_attn_implementation("sdpa")
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    queries = []
    for idx in range(c.num_hidden_layers):
        q = captured[idx].view(1, ids.shape[1], c.num_attention_heads, head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        queries.append(q)
    return queries, out.attentions


def test_score_heads_kv_export_averages_each_group(tiny_exports, tmp_path):
    """The format before --score-heads: `score` averaged over each KV group's query heads, and a
    manifest that says so (an old manifest without the field reads as "kv")."""
    from kvtrt.export import export_model
    from kvtrt.manifest import Manifest

    model, tokenizer, directory = tiny_exports["llama"]
    c = model.config
    old = tmp_path / "kv-scores"
    export_model((model, tokenizer), old, progress=False, score_window=4, score_heads="kv")
    assert Manifest.load(old).score_heads == "kv" and Manifest.load(directory).score_heads == "query"
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(4))
    args = (ids, [list(range(12))], np.zeros((1, 0)), _empty_past(model))
    per_query, per_group = _run(_session(directory, "prefill"), *args), _run(_session(old, "prefill"), *args)
    for layer in range(c.num_hidden_layers):
        heads = per_query[f"score.{layer}"][0]  # [H, 12]
        assert heads.shape[0] == c.num_attention_heads
        ref = heads.reshape(c.num_key_value_heads, -1, 12).mean(axis=1)
        np.testing.assert_allclose(per_group[f"score.{layer}"][0], ref, atol=1e-6)
    data = json.loads((old / "manifest.json").read_text())
    del data["score_heads"]
    (old / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(old).score_heads == "kv"
    with pytest.raises(KVSpecError, match="signature=query needs per-query-head scores.*re-export"):
        kvtrt.load(old, kv="kvcrush:budget=64,signature=query")


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
    chosen = [0, 2]  # any rows of the chunk, not only the last ones
    out2_rows = _run(prefill, ids[:, 10:14], [list(range(10, 14))], np.ones((1, 10)), past, rows=chosen)
    past = _append(past, out2)
    out3 = _run(decode, ids[:, 14:15], [[14]], np.ones((1, 14)), past)
    for layer in range(c.num_hidden_layers):
        attn = attentions[layer][0].numpy()  # [H, S, S]
        for result, end in ((out, 10), (out2, 14), (out3, 15)):
            q_ref = queries[layer][0, :, end - 1].numpy() * head_dim ** -0.5
            np.testing.assert_allclose(result[f"query.{layer}"][0], q_ref, atol=1e-4, rtol=1e-4)
        # score: per query head (HF's head order), the mass from the last `window` queries of the call
        for result, start, end in ((out, 0, 10), (out2, 10, 14), (out3, 14, 15)):
            rows = attn[:, max(start, end - window):end, :end]  # queries of this call only
            np.testing.assert_allclose(result[f"score.{layer}"][0], rows.mean(axis=1), atol=1e-5)
        picked = attn[:, [10 + r for r in chosen], :14]
        np.testing.assert_allclose(out2_rows[f"score.{layer}"][0], picked.mean(axis=1), atol=1e-5)
        np.testing.assert_allclose(out2_rows["logits"], out2["logits"], atol=0)  # rows change only the score


def test_fused_and_standard_op_prefill_agree(tiny_llama, tmp_path):
    """`--attention gqa` (com.microsoft GroupQueryAttention, the fp32 default) and `ops`
    (standard ONNX, for TensorRT) give the same outputs, for a batch of two with a past that has a
    dead slot holding garbage and a chunk shorter than the score window on one call, longer on the other."""
    from tiny import tiny_tokenizer

    from kvtrt.export import export_model
    from kvtrt.manifest import Manifest

    model, _, fused_dir = tiny_llama
    ops_dir = tmp_path / "ops"
    score_window = Manifest.load(fused_dir).score_window
    export_model((model, tiny_tokenizer()), ops_dir, attention="ops", score_window=score_window,
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


def _run_in_place(session, feeds, outputs, buffers):
    """Run an in-place graph as the runtime does: `buffers` (past_key.0, past_value.0, ...) bound
    as both past and present through IO binding, `outputs` filled in place."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name, array in outputs.items():
        binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
    for i, b in enumerate(buffers):
        kind, layer = ("key", "value")[i % 2], i // 2
        binding.bind_input(f"past_{kind}.{layer}", "cpu", 0, np.float32, b.shape, b.ctypes.data)
        binding.bind_output(f"present_{kind}.{layer}", "cpu", 0, np.float32, b.shape, b.ctypes.data)
    session.run_with_iobinding(binding)


def test_shared_cache_decode_writes_in_place_and_matches_decode(tiny_llama):
    """The `decode_shared` graph, run the way the runtime runs it (past and present bound to the same
    buffers through IO binding), gives the `decode` graph's logits, writes exactly the new token's
    K/V into `write_slot` and leaves every other slot untouched; dead slots (garbage inside) and the
    free slots after `write_slot` are ignored."""
    model, _, directory = tiny_llama
    shared, decode = _session(directory, "decode_shared"), _session(directory, "decode")
    c = model.config
    layers, head_dim = c.num_hidden_layers, c.hidden_size // c.num_attention_heads
    rng = np.random.default_rng(1)
    past_len, capacity = 11, 16
    buffers = [rng.standard_normal((2, c.num_key_value_heads, capacity, head_dim)).astype(np.float32)
               for _ in range(2 * layers)]
    mask = np.zeros((2, capacity), np.int64)
    mask[:, :past_len + 1] = 1  # the written slot counts as live
    mask[0, 3] = mask[1, :2] = 0  # a hole, and left padding of the shorter sequence
    for b in buffers:
        b[0, :, 3], b[1, :, :2] = 1e4, -1e4  # garbage in the dead slots
        b[:, :, past_len + 1:] = np.nan  # free slots after the write slot are never read
    before = [b.copy() for b in buffers]
    ids, positions = np.array([[7], [42]]), np.array([[past_len], [past_len - 2]])
    expect = _run(decode, ids, positions, mask[:, :past_len],
                  [(buffers[2 * i][:, :, :past_len], buffers[2 * i + 1][:, :, :past_len]) for i in range(layers)])
    feeds = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64), "past_mask": mask,
             "write_slot": np.array([past_len, past_len], np.int64)}
    logits = np.zeros((2, 1, c.vocab_size), np.float32)
    _run_in_place(shared, feeds, {"logits": logits}, buffers)
    np.testing.assert_allclose(logits, expect["logits"], atol=2e-5, rtol=1e-4)
    for layer in range(layers):
        for j, kind in enumerate(("key", "value")):
            b, old = buffers[2 * layer + j], before[2 * layer + j]
            np.testing.assert_allclose(b[:, :, past_len], expect[f"{kind}.{layer}"][:, :, 0], atol=1e-5, rtol=1e-5)
            others = [s for s in range(capacity) if s != past_len]
            np.testing.assert_array_equal(b[:, :, others], old[:, :, others])  # NaN == NaN here


def test_shared_cache_decode_rows_end_at_their_own_slots(tiny_llama):
    """`decode_shared` with a write slot per row (rows of different lengths, left-aligned in one
    buffer): each row's logits, query and written K/V equal the same row run alone with a buffer
    that ends at its own slot; a row never reads past its slot (NaN there, as the other rows'
    longer spans would leave) and no slot but its own is written."""
    model, _, directory = tiny_llama
    shared = _session(directory, "decode_shared")
    c = model.config
    layers, head_dim, kv = c.num_hidden_layers, c.hidden_size // c.num_attention_heads, c.num_key_value_heads
    rng = np.random.default_rng(2)
    lengths, capacity = [11, 4, 7], 16
    buffers = [rng.standard_normal((3, kv, capacity, head_dim)).astype(np.float32) for _ in range(2 * layers)]
    mask = np.zeros((3, capacity), np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n + 1] = 1
        for b in buffers:
            b[row, :, n + 1:] = np.nan  # past the row's own slot: never read
    before = [b.copy() for b in buffers]
    ids, positions = np.array([[7], [42], [3]]), np.array([[n] for n in lengths])
    feeds = {"input_ids": ids, "position_ids": positions, "past_mask": mask,
             "write_slot": np.array(lengths, np.int64)}
    logits = np.zeros((3, 1, c.vocab_size), np.float32)
    queries = {f"query.{layer}": np.zeros((3, c.num_attention_heads, head_dim), np.float32) for layer in range(layers)}
    _run_in_place(shared, feeds, {"logits": logits, **queries}, buffers)
    assert np.isfinite(logits).all()
    for row, n in enumerate(lengths):
        alone = [b[row:row + 1, :, :n + 1].copy() for b in before]
        one = {"input_ids": ids[row:row + 1], "position_ids": positions[row:row + 1], "past_mask": mask[row:row + 1, :n + 1],
               "write_slot": np.array([n], np.int64)}
        expect = np.zeros((1, 1, c.vocab_size), np.float32)
        q = {f"query.{layer}": np.zeros((1, c.num_attention_heads, head_dim), np.float32) for layer in range(layers)}
        _run_in_place(shared, one, {"logits": expect, **q}, alone)
        np.testing.assert_allclose(logits[row], expect[0], atol=2e-5, rtol=1e-4)
        for name in q:
            np.testing.assert_allclose(queries[name][row], q[name][0], atol=1e-5, rtol=1e-5)
        for b, a, old in zip(buffers, alone, before):
            np.testing.assert_allclose(b[row, :, :n + 1], a[0], atol=1e-5, rtol=1e-5)  # its slot n, written
            np.testing.assert_array_equal(b[row, :, :n], old[row, :, :n])
            np.testing.assert_array_equal(b[row, :, n + 1:], old[row, :, n + 1:])  # NaN == NaN here


def test_shared_cache_prefill_writes_the_chunk_in_place_and_matches_prefill(tiny_llama):
    """`prefill_shared`, run as the runtime runs it (store buffers bound as past and present), gives
    the `prefill` graph's logits, query and score (for chosen rows), writes the chunk's K/V into
    slots [write_slot, write_slot + S) and nothing else; dead slots hold garbage, free slots NaN."""
    model, _, directory = tiny_llama
    shared, prefill = _session(directory, "prefill_shared"), _session(directory, "prefill")
    c = model.config
    layers, head_dim = c.num_hidden_layers, c.hidden_size // c.num_attention_heads
    rng = np.random.default_rng(2)
    past_len, new, capacity = 9, 6, 20
    buffers = [rng.standard_normal((1, c.num_key_value_heads, capacity, head_dim)).astype(np.float32)
               for _ in range(2 * layers)]
    mask = np.zeros((1, capacity), np.int64)
    mask[:, :past_len + new] = 1
    mask[0, 4] = 0
    for b in buffers:
        b[0, :, 4] = 1e4  # garbage in the dead slot
        b[:, :, past_len + new:] = np.nan  # free slots
    before = [b.copy() for b in buffers]
    ids, positions, rows = rng.integers(5, 200, (1, new)), np.arange(past_len, past_len + new)[None], [1, 3, 5]
    expect = _run(prefill, ids, positions, mask[:, :past_len],
                  [(buffers[2 * i][:, :, :past_len], buffers[2 * i + 1][:, :, :past_len]) for i in range(layers)],
                  rows=rows)
    feeds = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64), "past_mask": mask,
             "score_queries": np.array(rows, np.int64), "write_slot": np.array(past_len, np.int64)}
    got = {"logits": np.zeros((1, 1, c.vocab_size), np.float32)}
    for layer in range(layers):
        got[f"query.{layer}"] = np.zeros((1, c.num_attention_heads, head_dim), np.float32)
        got[f"score.{layer}"] = np.zeros((1, c.num_attention_heads, past_len + new), np.float32)
    _run_in_place(shared, feeds, got, buffers)
    for name, array in got.items():
        np.testing.assert_allclose(array, expect[name], atol=2e-5, rtol=1e-4, err_msg=name)
    chunk = slice(past_len, past_len + new)
    for layer in range(layers):
        for j, kind in enumerate(("key", "value")):
            b, old = buffers[2 * layer + j], before[2 * layer + j]
            np.testing.assert_allclose(b[:, :, chunk], expect[f"{kind}.{layer}"], atol=1e-5, rtol=1e-5)
            others = [s for s in range(capacity) if not past_len <= s < past_len + new]
            np.testing.assert_array_equal(b[:, :, others], old[:, :, others])  # NaN == NaN here


def test_every_graph_carries_the_contract_names(tiny_llama):
    """Each variant's exported inputs and outputs are `kvtrt.contract`'s, in order; the variant
    type says which graph reads `score_queries` and `write_slot` and which returns `score`."""
    from kvtrt.contract import input_names, output_names

    _, _, directory = tiny_llama
    for variant in GraphVariant:
        session = _session(directory, variant)
        ins, outs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        assert ins == input_names(2, variant) and outs == output_names(2, variant)
        assert ("score_queries" in ins) == variant.is_prefill and ("write_slot" in ins) == variant.in_place
        assert ("score.0" in outs) == variant.has_score and ("present_key.0" in outs) == variant.in_place
