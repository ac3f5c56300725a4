"""Text <-> token ids with the `tokenizers` library and the model's chat template (no transformers)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from ..manifest import Manifest

Messages = list[dict[str, str]]


class TextCodec:
    """Encodes prompts (plain or chat messages) and decodes generated ids, streaming-safe."""

    def __init__(self, directory: str | Path, manifest: Manifest):
        from tokenizers import Tokenizer

        self.manifest = manifest
        self.tokenizer = Tokenizer.from_file(str(Path(directory) / manifest.tokenizer_file))
        self._template = None
        if manifest.chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(manifest.chat_template)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, with BOS where the model's tokenizer adds it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.manifest.add_bos and self.manifest.bos_token_id is not None:
            ids = [self.manifest.bos_token_id] + ids
        return ids

    def render_chat(self, messages: Messages) -> str:
        """The chat template applied to `messages`, ending with the assistant prompt."""
        if self._template is None:
            raise ValueError("this model has no chat template; pass plain text instead of messages")
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.manifest.bos_token or "", eos_token=self.manifest.eos_token or "")

    def encode_chat(self, messages: Messages) -> list[int]:
        """Messages -> ids exactly as HF `apply_chat_template(..., add_generation_prompt=True)`."""
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete sequence decodes as U+FFFD)."""
        text = self.codec.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def _raise(message: str):
    raise ValueError(message)
