"""Evaluation hooks on the runtime's one decode path: teacher forcing, kept logits and one prefill
reused for several KV specs. Every call is an ordinary request to the loaded `LLM`'s scheduler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.kv.spec import KVSpec
from ..runtime.kv.store import KVStore
from ..runtime.prefill import PrefillJob
from ..runtime.request import RequestStats


@dataclass
class Prefill:
    """A prompt's prefill: its store (with attention scores), last logits [1,V], last query per layer."""

    ids: list[int]
    store: KVStore
    logits: np.ndarray  # engine arrays (numpy on the CPU)
    query: list[np.ndarray]

    def copy(self) -> tuple[KVStore, np.ndarray, list[np.ndarray]]:
        return self.store.clone(), self.logits, self.query


@dataclass
class Decoded:
    """What a request produced, with the hooks' records."""

    tokens: list[int]
    stats: RequestStats
    logprobs: list[float]  # log-probability of each token (the teacher's, when forced)
    logits: list[np.ndarray] | None  # every step's logits [V] (host copies) when kept


def prefill(llm, ids: list[int]) -> Prefill:
    """Run `ids` through the prefill graph once (scores tracked), to start several decodes from."""
    job = PrefillJob(llm.engine, ids, llm.prefill_chunk, track_scores=True)
    store, logits, query = job.run()
    return Prefill(ids, store, logits, query)


def decode(llm, ids: list[int], new_tokens: int, kv: KVSpec | str | None = None, *, teacher: list[int] | None = None,
           start: Prefill | None = None, stop_at_eos: bool = False, keep_logits: bool = False,
           cache: bool = False) -> Decoded:
    """Greedy decoding of `new_tokens` tokens after `ids` with the KV spec `kv` (the load's spec when
    None), through the scheduler like any request. `teacher`: feed these tokens instead and record
    their log-probabilities; `start`: begin from a copy of this prefill instead of prefilling;
    `keep_logits`: keep every step's logits; `cache`: leave the KV in the prefix cache for a next
    turn (and start from a cached conversation that `ids` continues). EOS ends it only with
    `stop_at_eos`."""
    seq = llm._sequence(ids, dict(max_new_tokens=new_tokens, temperature=0.0, top_k=0, top_p=1.0,
                                  repetition_penalty=1.0, min_new_tokens=0),
                        logprobs=0, ignore_eos=not stop_at_eos, kv=kv)
    if teacher is not None:
        if len(teacher) != new_tokens:
            raise ValueError(f"teacher has {len(teacher)} tokens, new_tokens is {new_tokens}")
        seq.forced = list(teacher)
    if start is not None:
        if start.ids != list(ids):
            raise ValueError("the prefill to start from was made for another prompt")
        seq.prefilled = start.copy()
    seq.kept_logits = [] if keep_logits else None
    seq.cache = cache
    result = llm.scheduler.submit(seq).result()
    return Decoded(result.token_ids, result.stats, [lp.logprob for lp in result.logprobs or []], seq.kept_logits)
