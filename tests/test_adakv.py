"""AdaKV (`adakv:`): per-head budgets at exactly the budget's bytes, on one slot pool per layer.

The pieces, each against a reference: the allocation on hand-made scores; the `decode_heads` graph
against the `decode` graph; the runtime's prompt compaction against HF transformers with the kept
tokens masked per layer and KV head; the whole pooled path (decode-time re-compaction included)
against SnapKV when AdaKV may not move budget between heads; rows beside other rows as alone.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kvtrt
from kvtrt.eval.decoding import decode, prefill
from kvtrt.manifest import Manifest
from kvtrt.runtime.kv.options import KVSpecError
from kvtrt.runtime.kv.spec import parse_kv_spec


def policy(spec: str):
    return parse_kv_spec(spec).compaction


# -- the allocation ------------------------------------------------------------------------------------
def test_allocation_moves_budget_to_the_heads_whose_mass_is_spread():
    """Hand-made scores, kernel 1 (no pooling): head 0's mass sits on two slots, head 1's is spread over
    its middle; the layer's 2 x 6 tokens: each head's sink (1) + window (1) + floor share, then the
    highest scores across both heads."""
    p = policy("adakv:budget=6,sink=1,window=1,kernel=1,floor=0.25")
    focused = np.array([5, 0, 0, 9, 0, 0, 8, 0, 0, 0, 0, 0, 3], dtype=np.float32)   # 13 slots
    spread = np.array([5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3], dtype=np.float32)
    kept = p.allocate([focused, spread], 6)
    # floor = 2 + int(0.25 * 4) = 3 each: head 0 takes slot 3 (9), head 1 slot 1 (first of the 4s);
    # the 6 left go to the best of the rest: head 0's 8, then head 1's 4s (ties: older slot first)
    assert [k.tolist() for k in kept] == [[0, 3, 6, 12], [0, 1, 2, 3, 4, 5, 6, 12]]
    assert sum(len(k) for k in kept) == 2 * 6


def test_allocation_keeps_the_total_sink_window_and_floor_of_every_head():
    rng = np.random.default_rng(0)
    p = policy("adakv:budget=0.25,sink=4,window=8,floor=0.2")
    for trial in range(20):
        heads, n = int(rng.integers(2, 6)), int(rng.integers(60, 300))
        keep = p.budget_tokens(n)
        skew = rng.pareto(0.5 + trial / 10, (heads, 1, n)).astype(np.float32)  # heads from flat to very peaked
        kept = p.allocate(list(skew * rng.random((heads, 3, n), dtype=np.float32)), keep)
        assert sum(len(k) for k in kept) == heads * keep
        floor = 12 + int(0.2 * (keep - 12))
        for k in kept:
            assert len(k) >= floor and len(set(k.tolist())) == len(k) and (np.diff(k) > 0).all()
            assert set(range(4)) | set(range(n - 8, n)) <= set(k.tolist())
    lengths = [10, 30]  # heads holding no more than the budget keep everything
    assert [len(k) for k in p.allocate([np.ones(n, np.float32) for n in lengths], 20)] == lengths


def test_floor_one_is_snapkv_per_head():
    """With floor=1 every head keeps exactly its uniform share: SnapKV's picks."""
    rng = np.random.default_rng(1)
    scores = rng.random((3, 3, 200), dtype=np.float32)
    ada = policy("adakv:budget=50,floor=1").allocate(list(scores), 50)
    snap = policy("snapkv:budget=50").select(scores, 50)
    assert [k.tolist() for k in ada] == snap.tolist()


@pytest.mark.parametrize("spec, words", [
    ("adakv:budget=64+freekv:budget=1024", "pages cannot hold"),
    ("adakv:budget=64,base=streaming", "base"),
    ("adakv", "budget"),
    ("adakv:budget=64,floor=2", "floor"),
])
def test_specs_it_refuses(spec, words):
    with pytest.raises(KVSpecError, match=words):
        parse_kv_spec(spec)


# -- the graph -----------------------------------------------------------------------------------------
def test_decode_heads_graph_equals_decode_with_every_head_in_one_pool(tiny_llama):
    """Each KV head's cache laid into one shuffled pool per layer (one slot dead in row 1, for every
    head): the same logits, new K/V, queries, and each slot's score as the `decode` graph's."""
    _, _, directory = tiny_llama
    m = Manifest.load(directory)
    L, Hkv, D, H = m.n_layers, m.n_kv_heads, m.head_dim, m.n_heads
    rng = np.random.default_rng(0)
    B, P = 2, 6
    past = [rng.standard_normal((B, Hkv, P, D)).astype(np.float32) for _ in range(2 * L)]
    mask = np.ones((B, P), np.int64)
    mask[1, 2] = 0
    ids, pos = np.array([[5], [9]]), np.array([[P], [P]])
    feeds = {"input_ids": ids, "position_ids": pos, "past_mask": mask}
    order = rng.permutation(Hkv * P)
    owner, token = np.repeat(np.arange(Hkv), P)[order], np.tile(np.arange(P), Hkv)[order]  # per pool slot
    owners = np.broadcast_to(owner, (B, L, Hkv * P)).copy()
    owners[1, :, token == 2] = -1
    pooled = {"input_ids": ids, "position_ids": pos, "past_owner": owners}
    for layer in range(L):
        for i, kind in enumerate(("key", "value")):
            feeds[f"past_{kind}.{layer}"] = past[2 * layer + i]
            pooled[f"past_{kind}.{layer}"] = past[2 * layer + i][:, owner, token][:, None]  # [B,1,Hkv*P,D]
    dense = ort.InferenceSession(str(directory / m.graphs["decode"]))
    heads = ort.InferenceSession(str(directory / m.graphs["decode_heads"]))
    names = [o.name for o in dense.get_outputs()]
    assert names == [o.name for o in heads.get_outputs()]
    group = H // Hkv if m.score_rows == H else 1
    for name, want, got in zip(names, dense.run(None, feeds), heads.run(None, pooled)):
        if name.startswith("score."):  # pool slot -> (its head's rows, its token)
            back = np.zeros_like(want)
            back[..., -1] = got[..., -1]
            for r in range(want.shape[1]):
                mine = owner == r // group
                back[:, r, token[mine]] = got[:, r, :-1][:, mine]
            got = back
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


# -- the runtime ---------------------------------------------------------------------------------------
def _ids(n: int, seed: int = 1) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(5, 250, n)]


def test_prompt_compaction_equals_hf_with_the_allocated_tokens_masked(tiny_llama):
    """After the prompt is compacted into the pool, each teacher-forced step's logits are HF
    transformers' with, in every layer and KV head, exactly the tokens `allocate` chose from the
    prompt's scores (and every continuation token) visible."""
    model, _, directory = tiny_llama
    llm = kvtrt.load(directory, threads=1)
    prompt, targets = _ids(80), _ids(6, seed=2)
    spec = "adakv:budget=24,window=4,slack=16"
    start = prefill(llm, prompt)
    p, keep = policy(spec), 24
    kept = [p.allocate(list(start.store.grouped_scores(layer)[..., :len(prompt)]), keep)
            for layer in range(llm.manifest.n_layers)]
    got = decode(llm, prompt, len(targets), spec, teacher=targets, start=start, keep_logits=True)
    assert got.stats.compactions == 1
    assert len({len(k) for layer in kept for k in layer}) > 1  # the heads did keep different numbers

    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    n, steps = len(prompt), len(targets) - 1
    total = n + steps
    hooks, previous = [], model.config._attn_implementation
    for layer, module in enumerate(model.model.layers):  # one forward over prompt + continuation, no cache
        visible = torch.zeros(c.num_key_value_heads, n, dtype=torch.bool)
        for head, slots in enumerate(kept[layer]):
            visible[head, torch.as_tensor(slots)] = True
        bias = torch.full((total, total), float("-inf")).triu(1).expand(1, c.num_attention_heads, -1, -1).clone()
        bias[0, :, n:, :n].masked_fill_(~visible.repeat_interleave(group, 0)[:, None, :], float("-inf"))
        hooks.append(module.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, bias=bias: (args, {**kwargs, "attention_mask": bias}), with_kwargs=True))
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([prompt + targets[:-1]]), use_cache=False).logits[0, n:]
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
    # got.logits[0] is the prefill's (full prompt); steps 1.. attend the compacted pool
    np.testing.assert_allclose(np.stack(got.logits[1:]), want.numpy(), atol=1e-4)


def test_floor_one_decodes_as_snapkv_through_recompaction(tiny_llama):
    """With floor=1 AdaKV cannot move budget between heads, so the pooled path (join, score
    accumulation, re-compaction every `slack` tokens) must give SnapKV's dense path's tokens."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, threads=1)
    prompt = _ids(90)
    ada = llm.generate(prompt, max_new_tokens=40, ignore_eos=True, kv="adakv:budget=30,window=4,slack=8,floor=1")
    snap = llm.generate(prompt, max_new_tokens=40, ignore_eos=True, kv="snapkv:budget=30,window=4,slack=8")
    assert ada.stats.compactions == snap.stats.compactions >= 5
    assert ada.token_ids == snap.token_ids


def test_covering_budget_is_the_full_cache_and_rows_decode_as_alone(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, threads=1, max_batch=8)
    prompts = [_ids(n, seed=n) for n in (90, 40, 120)]
    full = llm.generate(prompts[0], max_new_tokens=30, ignore_eos=True).token_ids
    assert llm.generate(prompts[0], max_new_tokens=30, ignore_eos=True, kv="adakv:budget=200,window=4").token_ids == full
    specs = ["adakv:budget=24,window=4,slack=8", "adakv:budget=0.5,window=4,floor=0.5", "full",
             "snapkv:budget=24,window=4", "adakv:budget=16,window=4,slack=4"]
    jobs = [(prompts[i % 3], spec) for i, spec in enumerate(specs)]
    alone = [llm.generate(p, max_new_tokens=30, ignore_eos=True, kv=s).token_ids for p, s in jobs]
    requests = [llm.submit(p, max_new_tokens=30, ignore_eos=True, kv=s) for p, s in jobs]
    assert [r.result().token_ids for r in requests] == alone
    assert llm.stats().kv_bytes_used == 0


def test_kv_bytes_are_the_budgets(tiny_llama):
    """An AdaKV row holds Hkv x (budget + slack) slots per layer where a SnapKV row holds budget + slack per
    head: the same K/V bytes, in the request's stats and in what the scheduler counts for admission."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, threads=1)
    prompt = _ids(120)
    got = {spec: llm.generate(prompt, max_new_tokens=20, ignore_eos=True, kv=spec).stats.kv_bytes
           for spec in ("adakv:budget=32,window=4,slack=8", "snapkv:budget=32,window=4,slack=8")}
    assert len(set(got.values())) == 1 and got["snapkv:budget=32,window=4,slack=8"] > 0
    scheduler, m = llm.scheduler, llm.manifest
    seqs = {spec: llm._sequence(prompt, dict(max_new_tokens=20), kv=spec) for spec in got}
    ada, snap = (scheduler.worst_case_bytes(s, alone=True) for s in seqs.values())
    # beside the K/V: per pool slot an int64 owner and its score rows, where a SnapKV row has score rows per slot
    extra = m.n_kv_heads * m.n_layers * (8 + 4 * m.score_rows) - 4 * m.score_rows * m.n_layers
    assert ada - snap == (32 + 8) * extra


def test_an_engine_without_decode_heads_refuses_adakv_at_once(tiny_llama):
    """TensorRT builds no `decode_heads` engine: a spec that needs it is refused when checked, naming why."""
    from kvtrt.runtime.llm import check_kv_spec

    _, _, directory = tiny_llama
    m = Manifest.load(directory)
    check_kv_spec(parse_kv_spec("adakv:budget=64"), m)  # the ONNX Runtime export has it
    built = {name: None for name in m.variant_graphs}   # what `kvtrt build-engine` builds
    with pytest.raises(KVSpecError, match="decode_heads graph"):
        check_kv_spec(parse_kv_spec("adakv:budget=64"), m, built)
    check_kv_spec(parse_kv_spec("snapkv:budget=64"), m, built)
