"""Text <-> token ids with the `tokenizers` library and the model's chat template (no transformers).

The chat template renders as `transformers`' `apply_chat_template(..., tokenize=False)` renders it:
the same jinja environment (sandboxed, `trim_blocks`/`lstrip_blocks`, `loopcontrols`, the
`{% generation %}` tag, its `tojson`, `raise_exception`, `strftime_now`, `dict`, `namespace`), the
same variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens,
extra keyword arguments) and the same message clean-up (None-valued keys dropped, reasoning fields
aliased). Mirrors `transformers/utils/chat_template_utils.py` without importing transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..manifest import Manifest
from .detokenize import StopMatcher, StreamDecoder  # noqa: F401  (re-exported: the runtime's streaming API)

Messages = list[dict[str, Any]]

#: the special tokens transformers' `special_tokens_map` passes to every template
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: names a message's reasoning is passed under (transformers reads the first, gpt-oss templates `thinking`)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TextCodec:
    """Encodes prompts (plain or chat messages) and decodes generated ids."""

    def __init__(self, directory: str | Path, manifest: Manifest):
        from tokenizers import Tokenizer

        self.manifest = manifest
        self.tokenizer = Tokenizer.from_file(str(Path(directory) / manifest.tokenizer_file))
        self.special_tokens = _special_tokens(Path(directory), manifest)
        self._template = compile_chat_template(manifest.chat_template) if manifest.chat_template else None

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, with BOS where the model's tokenizer adds it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.manifest.add_bos and self.manifest.bos_token_id is not None:
            ids = [self.manifest.bos_token_id] + ids
        return ids

    def render_chat(self, messages: Messages, *, tools: Sequence[Mapping] | None = None,
                    documents: Sequence[Mapping] | None = None, add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        """The chat template applied to `messages`, as transformers'
        `apply_chat_template(messages, tools=..., documents=..., add_generation_prompt=..., tokenize=False, **kwargs)`
        renders it. `tools` are JSON schemas (dicts); `add_generation_prompt` (default True here: the
        runtime generates the assistant's turn) ends the text with the assistant header; `kwargs`
        are extra template variables (e.g. `enable_thinking=False`)."""
        if self._template is None:
            raise ValueError("this model has no chat template; pass plain text instead of messages")
        return render_chat_template(self._template, messages, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens, **kwargs})

    def encode_chat(self, messages: Messages, *, tools: Sequence[Mapping] | None = None,
                    documents: Sequence[Mapping] | None = None, add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Messages -> ids exactly as HF `apply_chat_template(..., tokenize=True)` (the rendered text
        encoded without adding special tokens: the template writes them)."""
        text = self.render_chat(messages, tools=tools, documents=documents,
                                add_generation_prompt=add_generation_prompt, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _special_tokens(directory: Path, manifest: Manifest) -> dict[str, str]:
    """bos/eos from the manifest, the other special tokens from the export's tokenizer_config.json."""
    tokens: dict[str, str] = {}
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = data.get(name)
            if isinstance(value, dict):  # an AddedToken as older transformers save it
                value = value.get("content")
            if isinstance(value, str):
                tokens[name] = value
    if manifest.bos_token is not None:
        tokens["bos_token"] = manifest.bos_token
    if manifest.eos_token is not None:
        tokens["eos_token"] = manifest.eos_token
    return tokens


# -- the chat template, as transformers renders it -------------------------------------------------
def compile_chat_template(source: str):
    """A jinja template compiled in transformers' chat-template environment."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tracker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: no HTML escaping (jinja's own escapes <, >, &, '), json.dumps options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` without handing the template the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces reject underscore-prefixed attributes (no way to CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def render_chat_template(template, messages: Messages, *, tools: Sequence[Mapping] | None = None,
                         documents: Sequence[Mapping] | None = None, add_generation_prompt: bool = False,
                         **kwargs: Any) -> str:
    """`template` (from `compile_chat_template`) rendered with the variables transformers passes."""
    if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) for m in messages):
        raise TypeError(f"chat messages must be a list of dicts, got {messages!r}")
    chat = [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]
    chat = _alias_reasoning_fields(chat)
    if tools is not None:
        tools = list(tools)
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TypeError(f"tools must be JSON schemas (dicts), got {tool!r}")
        tools = _plain(tools)
    if documents is not None:
        for document in documents:
            if not isinstance(document, Mapping):
                raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
        documents = _plain(list(documents))
    return template.render(messages=chat, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt, **_plain(kwargs))


def _plain(value: Any) -> Any:
    """A fresh copy made of plain JSON types (what transformers lets a template see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out
