"""What `LLM.submit` returns: a handle that streams a request's text and holds its result."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator


class QueueFullError(RuntimeError):
    """More requests are waiting than the `max_queue` the runtime was loaded with."""


class KVMemoryError(ValueError):
    """A request whose worst-case KV can never fit under the runtime's `kv_memory`."""


class RequestCancelled(RuntimeError):
    """`result()` of a request that was cancelled before it produced anything."""


@dataclass
class RequestStats:
    """Timings, tokens and KV of one request (seconds; bytes)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    reused_prefix_tokens: int = 0  # prompt tokens taken from a finished request's cached KV
    queue_wait_s: float = 0.0  # submit -> admitted
    prefill_s: float = 0.0  # admitted -> first token (chunks interleaved with other requests' steps)
    ttft_s: float = 0.0  # submit -> first token
    decode_s: float = 0.0  # joined the running batch (after its prefill / FreeKV pool) -> last token
    e2e_s: float = 0.0  # submit -> finished
    token_times: list[float] = field(default_factory=list)  # time.perf_counter() of each token
    submitted_at: float = 0.0  # time.perf_counter() clock, like token_times
    admitted_at: float = 0.0
    finished_at: float = 0.0
    decode_steps: int = 0
    kv_bytes: int = 0  # most KV this sequence held (its slots, or its FreeKV pool and views)
    kv_full_bytes: int = 0  # what the full cache would have held for prompt + output
    compactions: int = 0
    kv: dict = field(default_factory=dict)  # the KV policy's own stats (retrieval: correction_rate, ...)

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies (seconds between consecutive tokens)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second of this sequence."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    """What one prompt produced. `finish_reason`: "stop" (EOS or a stop string), "length" (the
    `max_new_tokens` limit) or "cancelled"."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    stats: RequestStats
    logprobs: list | None = None  # per token `TokenLogprobs(token, logprob, top)` when asked for


class Request:
    """A submitted request. Iterate it (or `async for` over `astream()`) for text pieces as they
    decode, `result()` for the whole `GenerationResult`, `cancel()` to end it and free its KV.
    Safe to use from any thread; the scheduler thread fills it."""

    def __init__(self, request_id: int, prompt_ids: list[int]):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self._pieces: list[str] = []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False

    # -- consumer side --------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def __iter__(self) -> Iterator[str]:
        seen = 0
        while True:
            with self._cond:
                while seen == len(self._pieces) and not self.done:
                    self._cond.wait()
                pieces, finished = self._pieces[seen:], self.done
            seen += len(pieces)
            yield from pieces
            if finished and seen == len(self._pieces):
                if self._error is not None:
                    raise self._error
                return

    async def astream(self) -> AsyncIterator[str]:
        """The text pieces, for asyncio code (never blocks the event loop)."""
        event = asyncio.Event()
        with self._cond:
            self._listeners.append((asyncio.get_running_loop(), event))
        seen = 0
        try:
            while True:
                with self._cond:
                    pieces, finished = self._pieces[seen:], self.done
                    event.clear()
                seen += len(pieces)
                for piece in pieces:
                    yield piece
                if finished:  # read under the lock with the pieces: none can follow
                    if self._error is not None:
                        raise self._error
                    return
                if not pieces:
                    await event.wait()
        finally:
            with self._cond:
                self._listeners = [(lp, ev) for lp, ev in self._listeners if ev is not event]

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its `GenerationResult` (raises what failed it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """End the request at the next step; its KV is freed and `finish_reason` is "cancelled"."""
        self.cancelled = True
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.wake()

    # -- producer side (the scheduler thread) ---------------------------------------------
    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, event in self._listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: its consumer is gone
                pass

    def _push(self, piece: str) -> None:
        if piece:
            with self._cond:
                self._pieces.append(piece)
                self._notify()

    def _finish(self, result: GenerationResult) -> None:
        with self._cond:
            self._result = result
            self._notify()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._notify()
