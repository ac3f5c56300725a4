"""Incremental detokenization and stop-string matching: O(1) work per generated token.

Per request the scheduler keeps one `StreamDecoder` and, when the request has stop strings, one
`StopMatcher`:

    decoder, matcher = StreamDecoder(codec), StopMatcher(stop)
    for token in tokens:                      # EOS ids are not pushed
        emit, stopped = matcher.feed(decoder.push(token))
        yield emit
        if stopped:
            break                             # finish_reason "stop"
    else:
        yield matcher.feed(decoder.flush())[0] + matcher.flush()

The concatenated pieces equal `codec.decode(ids)` (and, with stop strings, its text before the
earliest stop string), as decoding all the ids on every step did.
"""

from __future__ import annotations

from typing import Iterable, Protocol

REPLACEMENT = "\ufffd"  # what an incomplete (or invalid) UTF-8 sequence decodes to


class _Decodes(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class StreamDecoder:
    """Token ids in, text pieces out, decoding only a window of the last few tokens per step.

    The window starts one emitted piece back (`prefix`), so decoders that look at a token's
    neighbours (SentencePiece's leading-space strip, byte fallback, byte-level merges) see the
    same context as when decoding everything; text that ends in U+FFFD (a multi-byte character
    split across tokens) is held until the next tokens complete it. `flush()` returns what is
    still held at the end (an incomplete sequence as U+FFFD, as a full decode shows it).

    `codec` is a `TextCodec` (its `tokenizer` is used) or a `tokenizers.Tokenizer`.
    """

    def __init__(self, codec, skip_special_tokens: bool = True):
        self.tokenizer: _Decodes = getattr(codec, "tokenizer", codec)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the tokens of the piece emitted before the last one
        self._read = 0    # tokens up to here have been emitted as text
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """The text `token` completes ("" while a character is still incomplete)."""
        self.ids.append(int(token))
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""
        piece = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        return piece

    def extend(self, tokens: Iterable[int]) -> str:
        return "".join(self.push(t) for t in tokens)

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete sequence decodes as U+FFFD)."""
        text = self._decode(self.ids[self._prefix:])
        piece = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        return piece


class StopMatcher:
    """Finds the earliest stop string in streamed text without rescanning what was emitted.

    `feed(text)` returns `(emit, stopped)`: the text that can be shown now and whether a stop
    string was hit. It holds back the longest tail that is still the start of some stop string;
    on a hit, `emit` ends just before the stop string and the matcher is done (further feeds
    return `("", True)`). `flush()` returns the held tail once no more text will come.
    The stop is the first one completed reading the text character by character (a tie: the
    longest), however the text is cut into pieces: the text before it equals
    `first_stop(full_text, stop)`.
    With no stop strings every feed passes its text straight through.
    """

    def __init__(self, stop: str | Iterable[str] = ()):
        stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = tuple(dict.fromkeys(stop))
        self._longest = max(map(len, self.stop), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buf = self._held + text
        # an occurrence not found before ends in `text`, so it starts within the held tail or `text`;
        # the stop is the occurrence that ends first (the longest of those ending together), so the
        # result does not depend on how the text was cut into pieces
        hits = [(i + len(s), -len(s), i) for s in self.stop if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[:min(hits)[2]], True
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        for k in range(min(self._longest - 1, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """The held tail (no stop string can complete any more)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def first_stop(text: str, stop: Iterable[str]) -> tuple[str, bool]:
    """`text` up to the first stop string completed reading it left to right, and whether one was."""
    hits = [(i + len(s), -len(s), i) for s in stop if (i := text.find(s)) >= 0]
    return (text[:min(hits)[2]], True) if hits else (text, False)


def stream_text(decoder: StreamDecoder, matcher: StopMatcher, tokens: Iterable[int]) -> tuple[str, bool]:
    """All of `tokens` through `decoder` and `matcher` (then flushed): (text, stopped)."""
    out = []
    for token in tokens:
        emit, stopped = matcher.feed(decoder.push(token))
        out.append(emit)
        if stopped:
            return "".join(out), True
    emit, stopped = matcher.feed(decoder.flush())
    return "".join(out) + emit + ("" if stopped else matcher.flush()), stopped
