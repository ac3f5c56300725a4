"""The real default model (SmolLM2-135M from the bundled GGUF), exported once per session."""

from __future__ import annotations

import math

import pytest
import torch

import kvtrt
from kvtrt.eval.decoding import decode

from conftest import HAYSTACK, haystack_text

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]


def test_greedy_chat_matches_transformers(smollm2):
    model, tokenizer, directory = smollm2
    llm = kvtrt.load(directory)
    result = llm.generate(MESSAGES, max_new_tokens=32)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    assert result.prompt_ids == ids[0].tolist()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    expected = [t for t in expected if t not in llm.manifest.eos_token_ids][:len(result.token_ids)]
    assert len(result.token_ids) >= 16
    assert result.token_ids == expected
    assert result.text.strip() and result.text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.fixture(scope="module")
def long_sample(smollm2):
    _, _, directory = smollm2
    llm = kvtrt.load(directory)
    ids = llm.encode(haystack_text())  # real essays; filler when ../shared is absent (exactness only)
    return llm, ids[:1024], ids[1024:1088]


def _nll(llm, prompt, target, spec):
    out = decode(llm, prompt, len(target), spec, teacher=target)
    return -sum(out.logprobs) / len(out.logprobs), out


def test_retrieval_with_covering_budget_is_exact_on_real_text(long_sample):
    llm, prompt, _ = long_sample
    full = llm.generate(prompt, max_new_tokens=24)
    # an fp32 pool: exact (the default fp16 pool rounds recalled pages; test_freekv_pool_dtype.py)
    for spec in ("freekv:budget=2048,tau=0.9,min_context=0,pool_dtype=fp32",
                 "quest:budget=2048,min_context=0,pool_dtype=fp32"):
        assert kvtrt.load(llm.directory, kv=spec).generate(prompt, max_new_tokens=24).token_ids == full.token_ids


@pytest.mark.parametrize("spec", ["snapkv:budget=0.5", "kvcrush:budget=0.5,base=snapkv",
                                  "freekv:budget=512,tau=0.9,min_context=0",
                                  "kvcrush:budget=0.75+freekv:budget=512,min_context=0"])
def test_compressed_cache_stays_close_to_full_on_real_text(long_sample, spec):
    """Teacher-forced perplexity on an essay continuation: within 10% of the full cache's, while
    holding (compaction) or attending (retrieval) about half of the context."""
    if not HAYSTACK.exists():
        pytest.skip(f"quality check needs the real essays in {HAYSTACK}; filler text is not natural language")
    llm, prompt, target = long_sample
    full_nll, full_gen = _nll(llm, prompt, target, "full")
    nll, gen = _nll(llm, prompt, target, spec)
    assert math.exp(nll) / math.exp(full_nll) < 1.10
    if spec.startswith("kvcrush:budget=0.5") or spec.startswith("snapkv"):
        assert gen.stats.kv_bytes < 0.65 * full_gen.stats.kv_bytes
    if "freekv" in spec:
        assert gen.stats.kv["slots"] < 0.6 * len(prompt)
    if spec.startswith("kvcrush:budget=0.75+"):  # compaction shrinks what the pool stores
        assert gen.stats.kv["stored_bytes"] < 0.85 * full_gen.stats.kv_bytes
