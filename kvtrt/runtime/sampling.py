"""Next-token choice: greedy, or temperature with top-k / top-p, seeded; HF's repetition penalty and
min_new_tokens; top-n log-probabilities.

Two ways in:
- `Sampler(params)(logits [B, V]) -> [B]`: one set of params for every row (the original API).
- `Sampler(params).choose(row [V], seen_ids, n_generated, eos_ids) -> (token, TokenLogprobs | None)`:
  one sequence's row with its own options, so a scheduler batching sequences with different params
  calls each row's sampler (`choose_rows` does that for a `[B, V]` batch).

The order is HF `generate`'s: repetition penalty, then min_new_tokens, then temperature, top-k, top-p.
Logits may be numpy arrays or torch tensors (they are read on the host); the computation is numpy,
the draws come from a numpy generator seeded with `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .arrays import host


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters.

    repetition_penalty: HF's (1 = off): the logit of every token already in the prompt or the output
    is divided by it when positive, multiplied when negative. min_new_tokens: EOS cannot be chosen
    before this many new tokens. logprobs: None = off; n >= 0 = the chosen token's log-probability and
    the n most likely tokens' (from the model's logits, before penalties and temperature).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be None (off) or >= 0 (top-n alternatives), got {self.logprobs}")


@dataclass
class TokenLogprobs:
    """One generated token's log-probability and the `n` most likely tokens' (most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Picks next tokens for one set of `SamplingParams` (one sequence, or rows sharing them)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = np.random.default_rng(params.seed)

    # -- the original batch API (every row the same params, no penalties) ----------------------
    def __call__(self, logits) -> np.ndarray:
        """One token per row of `[B, V]` logits (temperature / top-k / top-p only); `[B]` int64."""
        logits = host(logits)
        if self.params.temperature == 0:
            return logits.argmax(axis=-1)
        return self._sample(logits.astype(np.float32))

    # -- one sequence's row with all options --------------------------------------------------
    def process(self, logits, seen_ids: Sequence[int] | np.ndarray = (), n_generated: int = 0,
                eos_ids: Sequence[int] = ()) -> np.ndarray:
        """`logits [V]` (fp32 copy) after the repetition penalty and min_new_tokens, as HF's logits
        processors leave them (before temperature / top-k / top-p).

        seen_ids: the ids of the prompt and the tokens generated so far (any order, repeats allowed),
        or a bool mask `[V]` of them; n_generated: how many new tokens precede this one."""
        p = self.params
        x = host(logits).reshape(-1).astype(np.float32)  # a copy: the caller's logits stay as they are
        if p.repetition_penalty != 1.0:
            mask = host(seen_ids) if not isinstance(seen_ids, (list, tuple)) else None
            if mask is not None and mask.dtype == np.bool_:
                x = np.where(mask, np.where(x < 0, x * np.float32(p.repetition_penalty),
                                            x / np.float32(p.repetition_penalty)), x)
            elif len(seen_ids):
                ids = np.unique(np.asarray(seen_ids if mask is None else mask, dtype=np.int64).reshape(-1))
                score = x[ids]
                x[ids] = np.where(score < 0, score * np.float32(p.repetition_penalty),
                                  score / np.float32(p.repetition_penalty))
        if n_generated < p.min_new_tokens and len(eos_ids):
            x[np.asarray(list(eos_ids), dtype=np.int64)] = -np.inf
        return x

    def choose(self, logits, seen_ids: Sequence[int] | np.ndarray = (), n_generated: int = 0,
               eos_ids: Sequence[int] = ()) -> tuple[int, TokenLogprobs | None]:
        """The next token for one sequence from its `logits [V]` (or `[1, V]`), and its
        log-probabilities when `params.logprobs` is set. See `process` for the arguments."""
        x = self.process(logits, seen_ids, n_generated, eos_ids)
        if self.params.temperature == 0:
            token = int(x.argmax())
        else:
            token = int(self._sample(x[None])[0])
        return token, (self.logprobs(logits, token) if self.params.logprobs is not None else None)

    def logprobs(self, logits, token: int) -> TokenLogprobs:
        """`token`'s log-probability under the model's logits `[V]` and the `params.logprobs` most likely."""
        logp = log_softmax(host(logits).reshape(-1).astype(np.float32))
        n = min(self.params.logprobs or 0, logp.shape[-1])
        top = []
        if n:
            ids = np.argpartition(-logp, n - 1)[:n]
            ids = ids[np.argsort(-logp[ids], kind="stable")]
            top = [(int(i), float(logp[i])) for i in ids]
        return TokenLogprobs(token, float(logp[token]), top)

    # -- shared ----------------------------------------------------------------------------------
    def _sample(self, logits: np.ndarray) -> np.ndarray:
        """Temperature, top-k, top-p on fp32 `[B, V]`, then one draw per row from the generator."""
        p = self.params
        logits = logits / np.float32(p.temperature)
        if p.top_k:
            k = min(p.top_k, logits.shape[-1])
            kth = -np.partition(-logits, k - 1, axis=-1)[..., k - 1:k]  # the k-th largest per row
            logits = np.where(logits < kth, -np.inf, logits)
        if p.top_p < 1:
            order = np.argsort(-logits, axis=-1, kind="stable")
            sorted_logits = np.take_along_axis(logits, order, -1)
            probs = softmax(sorted_logits)
            drop = np.cumsum(probs, -1) - probs > p.top_p  # keep the token that crosses top_p
            sorted_logits = np.where(drop, -np.inf, sorted_logits)
            logits = np.full_like(logits, -np.inf)
            np.put_along_axis(logits, order, sorted_logits, -1)
        probs = softmax(logits.astype(np.float64))
        cumulative = np.cumsum(probs, -1)
        draws = self.generator.random(len(probs)) * cumulative[:, -1]
        tokens = [int(np.searchsorted(c, u, side="right")) for c, u in zip(cumulative, draws)]
        return np.minimum(np.asarray(tokens, dtype=np.int64), probs.shape[-1] - 1)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (-inf entries get 0)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in x's dtype."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def choose_rows(samplers: Sequence[Sampler], logits, seen_ids: Sequence[Sequence[int] | np.ndarray],
                n_generated: Sequence[int], eos_ids: Sequence[int]) -> list[tuple[int, TokenLogprobs | None]]:
    """`Sampler.choose` for each row of `logits [B, V]` (or `[B, 1, V]`) with that row's sampler,
    seen ids and count of new tokens. Rows that are plain greedy share one argmax."""
    logits = host(logits)
    logits = logits.reshape(logits.shape[0], -1)
    plain = [s.params.temperature == 0 and s.params.repetition_penalty == 1.0 and s.params.logprobs is None
             and n >= s.params.min_new_tokens for s, n in zip(samplers, n_generated)]
    argmax = logits.argmax(axis=-1).tolist() if any(plain) else None
    return [(argmax[b], None) if plain[b] else samplers[b].choose(logits[b], seen_ids[b], n_generated[b], eos_ids)
            for b in range(logits.shape[0])]
