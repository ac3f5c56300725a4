"""Next-token choice: greedy, or temperature with top-k / top-p, seeded; HF's repetition penalty and
min_new_tokens; top-n log-probabilities.

Two ways in:
- `Sampler(params)(logits [B, V]) -> [B]`: one set of params for every row (the original API).
- `Sampler(params).choose(row [V], seen_ids, n_generated, eos_ids) -> (token, TokenLogprobs | None)`:
  one sequence's row with its own options, so a scheduler batching sequences with different params
  calls each row's sampler (`choose_rows` does that for a `[B, V]` batch).

The order is HF `generate`'s: repetition penalty, then min_new_tokens, then temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


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
        self.generator = torch.Generator().manual_seed(params.seed)

    # -- the original batch API (every row the same params, no penalties) ----------------------
    def __call__(self, logits: Tensor) -> Tensor:
        """One token per row of `[B, V]` logits (temperature / top-k / top-p only)."""
        if self.params.temperature == 0:
            return logits.argmax(dim=-1)
        return self._sample(logits.float())

    # -- one sequence's row with all options --------------------------------------------------
    def process(self, logits: Tensor, seen_ids: Sequence[int] | Tensor = (), n_generated: int = 0,
                eos_ids: Sequence[int] = ()) -> Tensor:
        """`logits [V]` (fp32 copy) after the repetition penalty and min_new_tokens, as HF's logits
        processors leave them (before temperature / top-k / top-p).

        seen_ids: the ids of the prompt and the tokens generated so far (any order, repeats allowed),
        or a bool mask `[V]` of them; n_generated: how many new tokens precede this one."""
        p = self.params
        x = logits.detach().reshape(-1).float().clone()
        if p.repetition_penalty != 1.0:
            if isinstance(seen_ids, Tensor) and seen_ids.dtype == torch.bool:
                seen = seen_ids.to(x.device)
                x = torch.where(seen, torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty), x)
            elif len(seen_ids):
                ids = torch.as_tensor(seen_ids, dtype=torch.long, device=x.device).reshape(-1).unique()
                score = x[ids]
                x[ids] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        if n_generated < p.min_new_tokens and len(eos_ids):
            x[torch.as_tensor(list(eos_ids), dtype=torch.long, device=x.device)] = float("-inf")
        return x

    def choose(self, logits: Tensor, seen_ids: Sequence[int] | Tensor = (), n_generated: int = 0,
               eos_ids: Sequence[int] = ()) -> tuple[int, TokenLogprobs | None]:
        """The next token for one sequence from its `logits [V]` (or `[1, V]`), and its
        log-probabilities when `params.logprobs` is set. See `process` for the arguments."""
        x = self.process(logits, seen_ids, n_generated, eos_ids)
        if self.params.temperature == 0:
            token = int(x.argmax())
        else:
            token = int(self._sample(x[None])[0])
        return token, (self.logprobs(logits, token) if self.params.logprobs is not None else None)

    def logprobs(self, logits: Tensor, token: int) -> TokenLogprobs:
        """`token`'s log-probability under the model's logits `[V]` and the `params.logprobs` most likely."""
        logp = torch.log_softmax(logits.detach().reshape(-1).float(), dim=-1)
        n = min(self.params.logprobs or 0, logp.shape[-1])
        top = []
        if n:
            values, ids = torch.topk(logp, n)
            top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprobs(token, float(logp[token]), top)

    # -- shared ----------------------------------------------------------------------------------
    def _sample(self, logits: Tensor) -> Tensor:
        """Temperature, top-k, top-p on fp32 `[B, V]`, then one draw per row from the generator."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > p.top_p  # keep the token that crosses top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).to(logits.device)


def choose_rows(samplers: Sequence[Sampler], logits: Tensor, seen_ids: Sequence[Sequence[int] | Tensor],
                n_generated: Sequence[int], eos_ids: Sequence[int]) -> list[tuple[int, TokenLogprobs | None]]:
    """`Sampler.choose` for each row of `logits [B, V]` (or `[B, 1, V]`) with that row's sampler,
    seen ids and count of new tokens. Rows that are plain greedy share one argmax."""
    logits = logits.reshape(logits.shape[0], -1)
    plain = [s.params.temperature == 0 and s.params.repetition_penalty == 1.0 and s.params.logprobs is None
             and n >= s.params.min_new_tokens for s, n in zip(samplers, n_generated)]
    argmax = logits.argmax(dim=-1).tolist() if any(plain) else None
    return [(argmax[b], None) if plain[b] else samplers[b].choose(logits[b], seen_ids[b], n_generated[b], eos_ids)
            for b in range(logits.shape[0])]
