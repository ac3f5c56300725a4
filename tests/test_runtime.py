"""The runtime against HF greedy generation, batching, streaming, threads and clear errors (tiny models)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import Counter

import pytest
import torch

import kvtrt
from kvtrt.manifest import ExportMismatchError
from kvtrt.runtime.llm import PromptTooLongError

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived"]


def hf_greedy(model, tokenizer, prompt, n):
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("chunk", [512, 5])
def test_greedy_matches_hf(tiny_exports, family, chunk):
    model, tokenizer, directory = tiny_exports[family]
    llm = kvtrt.load(directory, prefill_chunk=chunk)
    llm.manifest.eos_token_ids = []  # generate all 32 tokens, like HF with eos_token_id=None
    result = llm.generate(PROMPTS[1], max_new_tokens=32)
    assert result.prompt_ids == tokenizer(PROMPTS[1]).input_ids
    assert result.token_ids == hf_greedy(model, tokenizer, PROMPTS[1], 32)


def test_batch_of_different_lengths_matches_single_and_hf(tiny_llama):
    model, tokenizer, directory = tiny_llama
    llm = kvtrt.load(directory, prefill_chunk=6)
    llm.manifest.eos_token_ids = []
    batch = llm.generate(PROMPTS, max_new_tokens=32)
    assert len(batch) == 2
    for prompt, result in zip(PROMPTS, batch):
        assert result.token_ids == hf_greedy(model, tokenizer, prompt, 32)


def test_full_cache_decodes_in_place_across_reallocations(tiny_llama, monkeypatch):
    """A gqa export decodes the full cache with the `decode_shared` graph (K/V written in place, no
    append), also across reallocations of the batch (a longer row joining reallocates it), token-identical
    to HF; a batch too."""
    model, tokenizer, directory = tiny_llama
    llm = kvtrt.load(directory)
    # one prefill and one decode session (each holds its own prepacked weights), the other on demand
    assert set(llm.engine.sessions) == {"prefill_shared", "decode_shared"}
    assert set(kvtrt.load(directory, kv="h2o:budget=64").engine.sessions) == {"prefill_shared", "decode"}
    llm.manifest.eos_token_ids = []
    ran = Counter()
    run = llm.engine.run
    monkeypatch.setattr(llm.engine, "run", lambda variant, binding, **kw: (ran.update([variant]), run(variant, binding, **kw)))
    result = llm.generate(PROMPTS[1], max_new_tokens=32)
    assert ran["decode_shared"] == 31 and ran["decode"] == 0, ran
    assert result.token_ids == hf_greedy(model, tokenizer, PROMPTS[1], 32)
    reallocations = llm.scheduler.dense.reallocations
    for prompt, one in zip(PROMPTS, llm.generate(PROMPTS, max_new_tokens=32)):  # the longer prompt joins second
        assert one.token_ids == hf_greedy(model, tokenizer, prompt, 32)
    assert llm.scheduler.dense.reallocations >= reallocations + 2


@pytest.mark.parametrize("share", [True, False], ids=["shared-weights-session", "python-session"])
def test_only_the_last_prefill_chunk_releases_the_arena(tiny_llama, monkeypatch, share):
    """A prompt's last prefill chunk runs with ONNX Runtime's arena shrinkage (its activations handed
    back before decoding), no other call does, through either kind of session; tokens stay HF's."""
    from kvtrt.runtime import engine as engine_module
    from kvtrt.runtime import ort_shared

    model, tokenizer, directory = tiny_llama
    monkeypatch.setattr(engine_module, "SHARE_WEIGHTS", share)
    llm = kvtrt.load(directory, prefill_chunk=8)
    llm.manifest.eos_token_ids = []
    calls = []
    run = llm.engine.run

    def recorded(variant, binding, release_arena=False):
        calls.append((variant, release_arena))
        run(variant, binding, release_arena=release_arena)

    monkeypatch.setattr(llm.engine, "run", recorded)
    prompt = " ".join(PROMPTS * 4)
    result = llm.generate(prompt, max_new_tokens=8)
    prefills = [release for variant, release in calls if variant.startswith("prefill")]
    assert len(prefills) > 1 and prefills[-1] and not any(prefills[:-1]), calls
    assert not any(release for variant, release in calls if not variant.startswith("prefill")), calls
    assert set(llm.engine._run_options) == {"shared" if share and ort_shared.available() else "python"}
    assert result.token_ids == hf_greedy(model, tokenizer, prompt, 8)


def test_stream_yields_the_generated_text(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    pieces = list(llm.stream(PROMPTS[0], max_new_tokens=20))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate(PROMPTS[0], max_new_tokens=20).text
    assert llm.last_stats.prompt_tokens == len(llm.encode(PROMPTS[0]))


def test_stop_string_ends_generation(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    full = llm.generate(PROMPTS[0], max_new_tokens=30).text
    stop = full[5:7]
    cut = llm.generate(PROMPTS[0], max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full[:full.find(stop)]
    assert "".join(llm.stream(PROMPTS[0], max_new_tokens=30, stop=[stop])) == cut.text


def test_chat_prompt_uses_the_template(tiny_llama):
    _, tokenizer, directory = tiny_llama
    llm = kvtrt.load(directory)
    messages = [{"role": "user", "content": "hi there"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert llm.encode(messages) == list(expected)
    assert llm.encode("hi there", chat=True) == list(expected)


def test_sampling_is_seeded(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    a = llm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7).token_ids
    b = llm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7).token_ids
    c = llm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8).token_ids
    assert a == b and a != c
    greedy = llm.generate(PROMPTS[0], max_new_tokens=16).token_ids
    assert llm.generate(PROMPTS[0], max_new_tokens=16, temperature=0.7, top_k=1).token_ids == greedy


def test_threads_share_one_llm(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, prefill_chunk=7)
    prompts = [PROMPTS[0], PROMPTS[1], "Zebras", "A longer prompt, about thread safety in services"]
    alone = [llm.generate(p, max_new_tokens=40).token_ids for p in prompts]
    got = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        got[i] = llm.generate(prompts[i], max_new_tokens=40).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_prompt_past_max_positions(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    long_prompt = "x" * 600  # 600 byte tokens > 512 positions
    with pytest.raises(PromptTooLongError, match="truncate"):
        llm.generate(long_prompt, max_new_tokens=8)
    result = llm.generate(long_prompt, max_new_tokens=8, truncate=True)
    assert len(result.prompt_ids) == 512 - 8


def test_missing_and_mismatched_exports(tiny_llama, tmp_path):
    _, _, directory = tiny_llama
    with pytest.raises(FileNotFoundError, match="kvtrt export"):
        kvtrt.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a kvtrt export"):
        kvtrt.load(tmp_path)
    for field, value, message in (("n_layers", 3, "inputs/outputs"), ("n_kv_heads", 4, "KV heads"),
                                  ("kvtrt_version", "9.9.0", "Re-export"), ("format", 99, "Re-export"),
                                  ("kv_dtype", "fp16", "manifest says fp16")):
        copy = tmp_path / f"copy-{field}"
        shutil.copytree(directory, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest[field] = value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ExportMismatchError, match=message):
            kvtrt.load(copy)


def test_unsupported_architecture_and_paths(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvtrt.export import export_model
    from kvtrt.models import UnsupportedModelError
    from tiny import tiny_tokenizer

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=261))
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama"):
        export_model((gpt2, tiny_tokenizer()), tmp_path / "gpt2", progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        export_model(str(tmp_path / "missing-model"), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        export_model("smollm2-135m", tmp_path / "out", dtype="int3", progress=False)


def test_export_refuses_a_transformers_that_misreads_gguf(monkeypatch, tmp_path):
    """transformers before 5.18 reads SmolLM2's GGUF with <|im_start|> as EOS (an export that never stops):
    the export names the installed version and the upgrade, before it loads anything."""
    import transformers

    from kvtrt.export import export_model
    from kvtrt.models.loading import require_transformers

    for old in ("5.2.0", "5.17.0", "4.57.6"):
        monkeypatch.setattr(transformers, "__version__", old)
        with pytest.raises(RuntimeError, match=rf"transformers>=5\.23, this environment has {re.escape(old)}.*pip install"):
            export_model(str(tmp_path / "model.gguf"), tmp_path / "out", progress=False)
    for ok in ("5.23.0", "5.24.0.dev0", "6.0.0"):
        require_transformers(ok)


def test_export_records_the_transformers_that_converted_it(tiny_llama):
    """The tokenizer an export holds depends on the transformers that converted the model (GGUF above all):
    the manifest says which one, so a cached export can be redone when it changes (tests/conftest.py)."""
    import transformers

    from kvtrt.manifest import Manifest

    assert Manifest.load(tiny_llama[2]).export_options["transformers"] == transformers.__version__
