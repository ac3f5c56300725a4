"""The KV manager inside the runtime: compaction equals HF with the evicted tokens masked,
retrieval with a covering budget equals the full cache, memory is really released."""

from __future__ import annotations

import pytest
import torch

import kvtrt
from kvtrt.eval.decoding import decode, prefill
from kvtrt.runtime.kv.spec import KVSpecError, parse_kv_spec

PROMPT = "In the beginning the startup had three founders, one idea and no money at all. " * 2


def _hf_logits_with_hidden(model, ids, hidden):
    """HF forward over `ids` where the LAST query may not see `hidden[l][h]` (set of positions) in
    layer l, KV head h: a per-layer, per-head 4D additive mask injected with pre-hooks (eager)."""
    c = model.config
    n, group = len(ids), c.num_attention_heads // c.num_key_value_heads
    causal = torch.full((n, n), float("-inf")).triu(1)
    hooks = []
    for layer, module in enumerate(model.model.layers):
        mask = causal.expand(1, c.num_attention_heads, n, n).clone()
        for head in range(c.num_attention_heads):
            mask[0, head, -1, list(hidden[layer][head // group])] = float("-inf")

        def hook(mod, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(module.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1]
    finally:
        model.config._attn_implementation = "sdpa"
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("spec", ["snapkv:budget=40", "h2o:budget=0.3,window=8",
                                  "kvcrush:budget=40,base=snapkv,ratio=0.25,anchor=alternating",
                                  "kvcrush:budget=48,base=h2o,window=8,granularity=page,page=8,anchor=mean"])
def test_compaction_equals_hf_with_evicted_tokens_masked(tiny_llama, spec):
    model, tokenizer, directory = tiny_llama
    llm = kvtrt.load(directory, kv=spec, prefill_chunk=32)
    ids = llm.encode(PROMPT)
    kv = parse_kv_spec(spec)
    policy = kv.compaction
    keep = policy.budget_tokens(len(ids))
    # the selection the runtime will make, from the same prefill
    probe = prefill(llm, ids)
    store, logits = probe.store, probe.logits
    first = int(logits.argmax())
    hidden = []
    for layer in range(model.config.num_hidden_layers):
        kept = policy.select(store.grouped_scores(layer), keep)
        hidden.append([set(range(len(ids))) - set(row.tolist()) for row in kept])
    assert all(len(h) == len(ids) - keep for heads in hidden for h in heads)
    out = decode(llm, ids, 2, kv, keep_logits=True)  # the runtime's own prefill and compaction
    assert out.tokens[0] == first and out.stats.compactions == 1
    reference = _hf_logits_with_hidden(model, ids + [first], hidden)
    torch.testing.assert_close(torch.from_numpy(out.logits[1]), reference, atol=1e-4, rtol=0)
    # and the evicted tokens matter: the full cache gives different logits
    full = _hf_logits_with_hidden(model, ids + [first], [[set()] * 2] * model.config.num_hidden_layers)
    assert (full - reference).abs().max() > 1e-3


def test_teacher_forced_logprobs_match_hf(tiny_llama):
    model, _, directory = tiny_llama
    llm = kvtrt.load(directory, prefill_chunk=16)
    ids = llm.encode(PROMPT)
    prompt, target = ids[:60], ids[60:80]
    out = decode(llm, prompt, len(target), teacher=target)
    assert out.tokens == target
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids[:80]])).logits[0, 59:79], -1)
    expected = ref.gather(1, torch.tensor(target)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", ["freekv:budget=4096,page=8,window=16,min_context=0",
                                  "quest:budget=4096,page=8,window=16,min_context=0",
                                  "freekv:budget=4096,page=8,window=16,tau=0,min_context=0"])
def test_retrieval_with_covering_budget_equals_full(tiny_llama, spec):
    _, _, directory = tiny_llama
    full = kvtrt.load(directory).generate(PROMPT, max_new_tokens=60)
    got = kvtrt.load(directory, kv=spec).generate(PROMPT, max_new_tokens=60)
    assert got.token_ids == full.token_ids


def test_retrieval_batch_with_covering_budget_equals_full(tiny_llama):
    _, _, directory = tiny_llama
    prompts = [PROMPT, "Short one"]
    full = kvtrt.load(directory).generate(prompts, max_new_tokens=40)
    spec = "freekv:budget=4096,page=8,window=16,min_context=0"
    got = kvtrt.load(directory, kv=spec).generate(prompts, max_new_tokens=40)
    assert [r.token_ids for r in got] == [r.token_ids for r in full]


def test_small_retrieval_budget_attends_fewer_tokens_and_reports_stats(tiny_llama):
    _, _, directory = tiny_llama
    result = kvtrt.load(directory, kv="freekv:budget=64,page=8,window=16,tau=0.5,min_context=0").generate(
        PROMPT, max_new_tokens=50)
    stats = result.stats.kv
    assert stats["retrieval_engaged"] == 1
    assert stats["slots"] <= 64 + 8
    assert 0 <= stats["correction_rate"] <= 1 and 0 <= stats["page_hit_rate"] <= 1
    assert stats["steps"] == 49


def test_retrieval_pool_summaries_built_during_prefill(tiny_llama):
    """With `summarize_in_prefill` (the GPU default) the scheduler announces a FreeKV prompt before
    its prefill and the manager summarizes each chunk's completed pages as it is written: the stats
    count them (every prompt page). On the CPU (the default there) they are built at the hand-over.
    Either way the tokens equal those of a decode whose pool was built after the prefill (the
    evaluation path)."""
    _, _, directory = tiny_llama
    spec = "freekv:budget=64,page=8,window=16,tau=0.5,min_context=0"
    llm = kvtrt.load(directory, kv=spec, prefill_chunk=16)
    ids = llm.encode(PROMPT * 2)
    assert llm.scheduler.retrieval.summarize_in_prefill is False  # a CPU engine
    at_start = llm.generate(ids, max_new_tokens=25, ignore_eos=True)
    assert at_start.stats.kv["pages_summarized_in_prefill"] == 0
    llm.scheduler.retrieval.summarize_in_prefill = True
    during = llm.generate(ids, max_new_tokens=25, ignore_eos=True)
    pages = (len(ids) - 4 - 16) // 8  # whole pages outside sink and window
    assert during.stats.kv["pages_summarized_in_prefill"] == pages > 0
    after = decode(llm, ids, 25, start=prefill(llm, ids))
    assert after.stats.kv["pages_summarized_in_prefill"] == 0
    assert during.token_ids == after.tokens == at_start.token_ids
    assert llm.stats().kv_bytes_used == 0


def test_retrieval_engages_only_above_min_context(tiny_llama):
    """A cache no longer than min_context (default twice the budget) decodes densely: exactly the
    full cache's tokens, and the stats say retrieval did not run; a longer one retrieves."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    n = len(llm.encode(PROMPT))
    full = llm.generate(PROMPT, max_new_tokens=30)
    retrieval = kvtrt.load(directory, kv=f"freekv:budget={n // 2},page=8,window=16")
    assert set(retrieval.engine.sessions) == {"prefill_shared", "decode_shared"}  # views decode in place too
    dense = retrieval.generate(PROMPT, max_new_tokens=30)
    assert dense.stats.kv == {"retrieval_engaged": 0, "retrieval_min_context": 2 * (n // 2)}
    assert dense.token_ids == full.token_ids
    sparse = kvtrt.load(directory, kv=f"freekv:budget={n // 2},page=8,window=16,min_context={n - 1}").generate(
        PROMPT, max_new_tokens=30)
    assert sparse.stats.kv["retrieval_engaged"] == 1 and sparse.stats.kv["slots"] < n


def test_decode_compaction_keeps_memory_bounded(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, kv="streaming:sink=4,window=28")
    result = llm.generate(PROMPT, max_new_tokens=150)
    per_token = llm.manifest.kv_bytes_per_token
    assert result.stats.compactions >= 2  # after prefill and again while decoding
    assert result.stats.kv_bytes <= (32 + 64) * per_token  # budget + slack, never the whole sequence
    assert result.stats.kv_full_bytes > 3 * result.stats.kv_bytes


@pytest.mark.parametrize("slack", [None, 20])
def test_streaming_decode_equals_a_sliding_window_reference(tiny_llama, slack):
    """StreamingLLM through several decode-time compactions: every step's logits equal HF run with
    a mask that shows each generated token exactly what the runtime had stored when it ran. With
    `slack=20` the sequence is compacted back to its budget every 20 tokens instead of 64."""
    model, _, directory = tiny_llama
    llm = kvtrt.load(directory, kv="streaming:sink=4,window=28" + (f",slack={slack}" if slack else ""))
    slack = slack or 64
    ids = llm.encode(PROMPT)[:40]
    out = decode(llm, ids, 100, keep_logits=True)
    seq = ids + out.tokens
    assert out.stats.compactions == (2 if slack == 64 else 5)  # after prefill, then at every budget + slack
    n = len(seq) - 1
    visible = torch.ones(n, n).tril().bool()
    for t in range(1, n - len(ids) + 1):  # decode step t runs the query token at row len(ids) + t - 1
        row = len(ids) + t - 1
        recent = _stored_after(len(ids), t, budget=32, slack=slack) - 4
        visible[row] = False
        visible[row, :4] = True
        visible[row, row - recent:row + 1] = True
    mask = torch.zeros(n, n).masked_fill(~visible, float("-inf")).expand(1, model.config.num_attention_heads, n, n)
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True)
        for layer in model.model.layers]
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            reference = model(torch.tensor([seq[:n]])).logits[0]
    finally:
        model.config._attn_implementation = "sdpa"
        for h in hooks:
            h.remove()
    for t in range(1, n - len(ids) + 1):
        torch.testing.assert_close(torch.from_numpy(out.logits[t]), reference[len(ids) + t - 1], atol=1e-4, rtol=0)


def _stored_after(prompt: int, step: int, budget: int, slack: int) -> int:
    """Stored tokens when decode step `step` runs: compacted to `budget` after prefill, then growing
    by one per step and compacted back to `budget` whenever `budget + slack` are stored."""
    stored = min(prompt, budget)
    for _ in range(step - 1):
        if stored == budget + slack:
            stored = budget
        stored += 1
    if stored == budget + slack:
        stored = budget
    return stored


@pytest.mark.parametrize("spec,message", [
    ("lru:budget=4", "unknown KV policy"), ("snapkv:budget=10,window=32", "sink"),
    ("kvcrush:budget=100,ratio=1.5", "ratio"), ("h2o:budget=100,colour=red", "colour"),
    ("freekv:budget=1024,tau=2", "tau"), ("freekv:budget=10", "budget"), ("snapkv:budget=100,window=16", "score-window"),
])
def test_bad_kv_specs_fail_at_load(tiny_llama, spec, message):
    _, _, directory = tiny_llama
    with pytest.raises(KVSpecError, match=message):
        kvtrt.load(directory, kv=spec)
