"""Sampling options against HF: repetition_penalty, min_new_tokens, logprobs; generation_config defaults.

The tiny exports are driven step by step through their contract graphs (ONNX Runtime directly) with
`Sampler.choose`, and compared token for token with HF `generate` given the same options. The same
comparisons then go through `llm.generate(...)`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kvtrt.manifest import GENERATION_FIELDS, Manifest, generation_defaults, generation_eos_ids
from kvtrt.runtime.sampling import Sampler, SamplingParams, TokenLogprobs, choose_rows

FAMILIES = ["llama", "mistral", "qwen2"]
PROMPT = [1, 40, 41, 42, 43, 40, 41, 42, 43, 100, 101, 102, 40, 41]


# -- a step-by-step driver over the contract graphs ----------------------------------------------
class _Graphs:
    def __init__(self, directory):
        manifest = Manifest.load(directory)
        self.manifest = manifest
        self.sessions = {v: ort.InferenceSession(str(directory / manifest.graphs[v]), providers=["CPUExecutionProvider"])
                         for v in ("prefill", "decode")}

    def _run(self, variant, ids, start, past):
        session = self.sessions[variant]
        n, m = len(ids), self.manifest
        feeds = {"input_ids": np.asarray([ids], np.int64), "position_ids": np.asarray([range(start, start + n)], np.int64),
                 "past_mask": np.ones((1, start), np.int64)}
        if "score_queries" in {i.name for i in session.get_inputs()}:
            feeds["score_queries"] = np.asarray([n - 1], np.int64)
        for layer, (k, v) in enumerate(past):
            feeds[f"past_key.{layer}"], feeds[f"past_value.{layer}"] = k, v
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        past = [(np.concatenate([k, out[f"key.{i}"]], 2), np.concatenate([v, out[f"value.{i}"]], 2))
                for i, (k, v) in enumerate(past)]
        return torch.from_numpy(out["logits"][0, 0].copy()), past

    def generate(self, prompt, sampler, max_new_tokens, eos_ids, seen_as_mask=False):
        """HF-style output: the new tokens, ending with the EOS token if one was chosen."""
        m = self.manifest
        empty = np.zeros((1, m.n_kv_heads, 0, m.head_dim), np.float32)
        logits, past = self._run("prefill", list(prompt), 0, [(empty, empty)] * m.n_layers)
        tokens, infos = [], []
        seen = torch.zeros(m.vocab_size, dtype=torch.bool)
        seen[list(prompt)] = True
        for _ in range(max_new_tokens):
            token, info = sampler.choose(logits, seen if seen_as_mask else list(prompt) + tokens, len(tokens), eos_ids)
            tokens.append(token)
            infos.append(info)
            seen[token] = True
            if token in eos_ids:
                break
            logits, past = self._run("decode", [token], len(prompt) + len(tokens) - 1, past)
        return tokens, infos


@pytest.fixture(scope="module")
def graphs(tiny_exports):
    return {family: _Graphs(tiny_exports[family][2]) for family in FAMILIES}


def _hf_generate(model, prompt, max_new_tokens, **options):
    ids = torch.tensor([prompt])
    if max_new_tokens is not None:  # None: the model's generation_config decides
        options["max_new_tokens"] = max_new_tokens
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **options)
    if isinstance(options.get("output_logits"), bool):
        return out.sequences[0, len(prompt):].tolist(), [step[0] for step in out.logits]
    return out[0, len(prompt):].tolist()


# -- against HF generate, token for token -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_repetition_penalty_matches_hf(tiny_exports, graphs, family, penalty):
    model = tiny_exports[family][0]
    expected = _hf_generate(model, PROMPT, 24, repetition_penalty=penalty, eos_token_id=None)
    plain = _hf_generate(model, PROMPT, 24, eos_token_id=None)
    assert expected != plain  # the penalty changes the greedy path, so the comparison means something
    sampler = Sampler(SamplingParams(repetition_penalty=penalty))
    got, _ = graphs[family].generate(PROMPT, sampler, 24, eos_ids=[])
    assert got == expected
    got_mask, _ = graphs[family].generate(PROMPT, sampler, 24, eos_ids=[], seen_as_mask=True)
    assert got_mask == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_min_new_tokens_matches_hf(tiny_exports, graphs, family):
    model = tiny_exports[family][0]
    plain = _hf_generate(model, PROMPT, 16, eos_token_id=None)
    eos = plain[2]  # a token greedy decoding picks early: make it the EOS
    assert _hf_generate(model, PROMPT, 16, eos_token_id=eos)[-1] == eos  # without the option, it ends early
    for min_new in (0, 6, 12):
        expected = _hf_generate(model, PROMPT, 16, eos_token_id=eos, min_new_tokens=min_new)
        got, _ = graphs[family].generate(PROMPT, Sampler(SamplingParams(min_new_tokens=min_new)), 16, [eos])
        assert got == expected
        assert eos not in got[:min_new]


@pytest.mark.parametrize("family", FAMILIES)
def test_repetition_penalty_and_min_new_tokens_together_match_hf(tiny_exports, graphs, family):
    model = tiny_exports[family][0]
    eos = _hf_generate(model, PROMPT, 8, eos_token_id=None, repetition_penalty=1.2)[3]
    expected = _hf_generate(model, PROMPT, 20, eos_token_id=eos, repetition_penalty=1.2, min_new_tokens=5)
    params = SamplingParams(repetition_penalty=1.2, min_new_tokens=5)
    assert graphs[family].generate(PROMPT, Sampler(params), 20, [eos])[0] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_hf(tiny_exports, graphs, family):
    model = tiny_exports[family][0]
    expected, logits = _hf_generate(model, PROMPT, 10, eos_token_id=None, repetition_penalty=1.3,
                                    output_logits=True, return_dict_in_generate=True)
    got, infos = graphs[family].generate(PROMPT, Sampler(SamplingParams(repetition_penalty=1.3, logprobs=5)), 10, [])
    assert got == expected
    for token, info, raw in zip(got, infos, logits):
        ref = torch.log_softmax(raw.float(), -1)
        assert isinstance(info, TokenLogprobs) and info.token == token
        assert info.logprob == pytest.approx(float(ref[token]), abs=1e-4)
        values, ids = torch.topk(ref, 5)
        assert [i for i, _ in info.top] == ids.tolist()
        np.testing.assert_allclose([v for _, v in info.top], values.numpy(), atol=1e-4)
        assert [v for _, v in info.top] == sorted((v for _, v in info.top), reverse=True)
    _, infos = graphs[family].generate(PROMPT, Sampler(SamplingParams(logprobs=0)), 3, [])
    assert all(i.top == [] and i.logprob <= 0 for i in infos)  # 0: the chosen token's only
    _, infos = graphs[family].generate(PROMPT, Sampler(SamplingParams()), 3, [])
    assert infos == [None] * 3


# -- the processors against HF's on random logits ------------------------------------------------------
def test_processors_match_hf_logits_processors():
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor, \
        RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    for penalty in (1.5, 0.6):
        logits = torch.randn(1, 300, generator=gen) * 4
        seen = torch.randint(0, 300, (1, 40), generator=gen)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
        sampler = Sampler(SamplingParams(repetition_penalty=penalty))
        torch.testing.assert_close(torch.from_numpy(sampler.process(logits[0], seen[0].tolist())), ref[0],
                                   rtol=0, atol=0)
        mask = torch.zeros(300, dtype=torch.bool)
        mask[seen[0]] = True
        torch.testing.assert_close(torch.from_numpy(sampler.process(logits[0], mask)), ref[0], rtol=0, atol=0)
    logits = torch.randn(1, 300, generator=gen)
    for generated in (0, 3, 4, 9):
        ids = torch.arange(10 + generated)[None]
        ref = MinNewTokensLengthLogitsProcessor(10, 4, [7, 9])(ids, logits.clone())
        got = Sampler(SamplingParams(min_new_tokens=4)).process(logits[0], (), generated, [7, 9])
        torch.testing.assert_close(torch.from_numpy(got), ref[0], rtol=0, atol=0)
    original = logits.clone()
    Sampler(SamplingParams(repetition_penalty=2.0, min_new_tokens=3)).process(logits[0], [1, 2], 0, [3])
    assert torch.equal(logits, original)  # the caller's logits are never modified


def test_old_batch_api_unchanged_and_choose_agrees():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen)
    assert Sampler(SamplingParams())(logits).tolist() == logits.argmax(-1).tolist()
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a, b = Sampler(params), Sampler(params)
    for _ in range(20):  # the same seed draws the same tokens through either API
        row = torch.randn(50, generator=gen)
        assert int(a(row[None])[0]) == b.choose(row)[0]
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError):
        SamplingParams(min_new_tokens=-1)
    with pytest.raises(ValueError):
        SamplingParams(logprobs=-1)


def test_draws_follow_the_filtered_distribution():
    """Seeded draws: only tokens that top-k / top-p keep, each about as often as its renormalized
    probability (4000 draws, a fixed seed: deterministic), and the same seed gives the same draws."""
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=np.float32))
    cases = {(0, 1.0): [0, 1, 2, 3, 4, 5], (3, 1.0): [0, 1, 2], (0, 0.7): [0, 1, 2]}  # 0.4+0.25 < 0.7: 2 crosses it
    for (top_k, top_p), support in cases.items():
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=11)
        draws = np.array([Sampler(params)(np.tile(logits, (4000, 1)))]).reshape(-1)
        assert sorted(set(draws.tolist())) == support
        p = np.exp(logits[support]) / np.exp(logits[support]).sum()
        freq = np.bincount(draws, minlength=6)[support] / len(draws)
        assert np.abs(freq - p).max() < 0.03, (top_k, top_p, freq, p)
        assert Sampler(params)(np.tile(logits, (50, 1))).tolist() == draws[:50].tolist()
    cold = Sampler(SamplingParams(temperature=0.05, seed=1))(np.tile(logits, (200, 1)))
    assert set(cold.tolist()) == {0}  # a low temperature sharpens toward the argmax


def test_choose_rows_applies_each_rows_params():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 60, generator=gen)
    params = [SamplingParams(), SamplingParams(repetition_penalty=3.0), SamplingParams(min_new_tokens=5, logprobs=2),
              SamplingParams(temperature=1.0, top_k=5, seed=3)]
    seen = [[1, 2], logits[1].topk(3).indices.tolist(), [], [4]]
    eos = [int(logits[2].argmax())]
    rows = choose_rows([Sampler(p) for p in params], logits, seen, [0, 0, 2, 0], eos)
    single = [Sampler(p).choose(logits[b], seen[b], [0, 0, 2, 0][b], eos) for b, p in enumerate(params)]
    assert rows == single
    assert rows[0][0] == int(logits[0].argmax())
    assert rows[1][0] not in seen[1]          # the penalty moved the choice off the seen tokens
    assert rows[2][0] != eos[0] and len(rows[2][1].top) == 2


# -- generation_config.json defaults ---------------------------------------------------------------------
def test_generation_defaults_from_generation_config():
    from transformers import GenerationConfig

    assert generation_defaults(None) == {}
    assert generation_defaults(GenerationConfig()) == {}
    assert generation_defaults(GenerationConfig(temperature=0.6, top_p=0.9)) == {}  # HF: greedy without do_sample
    sampled = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.1, max_new_tokens=256,
                               min_new_tokens=2, eos_token_id=[2, 7])
    assert generation_defaults(sampled) == {"temperature": 0.6, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1,
                                            "max_new_tokens": 256, "min_new_tokens": 2}
    assert set(generation_defaults(sampled)) <= set(GENERATION_FIELDS)
    assert generation_defaults(GenerationConfig(do_sample=True, top_k=0)) == {"temperature": 1.0, "top_k": 0}
    assert generation_eos_ids(sampled) == [2, 7] and generation_eos_ids(GenerationConfig(eos_token_id=5)) == [5]
    SamplingParams(**{k: v for k, v in generation_defaults(sampled).items() if k != "max_new_tokens"})  # valid params


@pytest.fixture(scope="module")
def tiny_with_generation_config(tmp_path_factory):
    """A tiny llama export whose generation_config.json asks for a repetition penalty and a second EOS."""
    from tiny import tiny_model, tiny_tokenizer

    from kvtrt.export import export_model

    model = tiny_model("llama")
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.max_new_tokens = 12
    model.generation_config.eos_token_id = [2, 4]
    directory = tmp_path_factory.mktemp("tiny-genconfig")
    export_model((model, tiny_tokenizer()), directory, progress=False, score_window=4)
    return model, directory


def test_export_writes_generation_defaults(tiny_with_generation_config, tiny_llama):
    _, directory = tiny_with_generation_config
    manifest = Manifest.load(directory)
    assert manifest.generation_defaults == {"repetition_penalty": 1.3, "max_new_tokens": 12}
    assert manifest.eos_token_ids == [2, 4]
    assert Manifest.load(tiny_llama[2]).generation_defaults == {}  # nothing set: nothing carried


# -- through llm.generate (options passed, and the export's generation defaults) -----------------------------
def _assert_as_hf(result, expected, eos_ids):
    """kvtrt's result (EOS not in token_ids, finish_reason "stop") against HF's tokens (EOS included)."""
    if result.finish_reason == "stop":
        assert expected[-1] in eos_ids
        expected = expected[:-1]
    else:
        assert result.finish_reason == "length" and expected[-1] not in eos_ids
    assert result.token_ids == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_generate_options_match_hf(tiny_exports, family):
    import kvtrt

    model, _, directory = tiny_exports[family]
    llm = kvtrt.load(directory)
    for penalty in (1.3, 0.8):
        expected = _hf_generate(model, PROMPT, 20, repetition_penalty=penalty)
        _assert_as_hf(llm.generate(PROMPT, max_new_tokens=20, repetition_penalty=penalty), expected, [2])
    eos = _hf_generate(model, PROMPT, 8, eos_token_id=None)[2]
    llm.manifest.eos_token_ids = [eos]
    for min_new in (0, 6):
        expected = _hf_generate(model, PROMPT, 16, eos_token_id=eos, min_new_tokens=min_new)
        _assert_as_hf(llm.generate(PROMPT, max_new_tokens=16, min_new_tokens=min_new), expected, [eos])
    expected = _hf_generate(model, PROMPT, 16, eos_token_id=eos, min_new_tokens=4, repetition_penalty=1.2)
    _assert_as_hf(llm.generate(PROMPT, max_new_tokens=16, min_new_tokens=4, repetition_penalty=1.2), expected, [eos])


def test_llm_generate_uses_generation_defaults(tiny_with_generation_config):
    import kvtrt

    model, directory = tiny_with_generation_config
    llm = kvtrt.load(directory)
    # HF generate applies the model's generation_config (penalty 1.3, at most 12 new tokens, EOS 2 or 4)
    _assert_as_hf(llm.generate(PROMPT), _hf_generate(model, PROMPT, None), [2, 4])
    _assert_as_hf(llm.generate(PROMPT, repetition_penalty=1.0), _hf_generate(model, PROMPT, None, repetition_penalty=1.0),
                  [2, 4])
    _assert_as_hf(llm.generate(PROMPT, max_new_tokens=5), _hf_generate(model, PROMPT, 5), [2, 4])
