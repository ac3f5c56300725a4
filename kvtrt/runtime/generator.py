"""One generation call: chunked prefill per sequence -> batched decode loop -> tokens.

`Generation.run()` yields `(sequence index, token id)` as tokens are chosen, so `generate` and
`stream` share one loop. The call owns its KV store and IO bindings; the engine is shared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .engine import Engine
from .kv.store import KVStore
from .sampling import Sampler, SamplingParams

DECODE_BUCKET = 256  # slots added at a time while decoding (one reallocation per bucket)


@dataclass
class GenerationStats:
    """Timings and memory of one call (all sequences of a batch together)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    kv_bytes: int = 0
    kv_full_bytes: int = 0
    kv: dict = field(default_factory=dict)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the prefill (the first token comes from its logits)."""
        return self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (per sequence)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def plan_chunks(n: int, chunk: int, min_last: int) -> list[tuple[int, int]]:
    """Split [0, n) into chunks of `chunk` tokens whose last one has at least `min_last` tokens
    (when n allows), so the graph's score window sees the last `min_last` prompt queries."""
    bounds = list(range(0, n, chunk)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_last:
        bounds[-2] = max(bounds[-3] + 1, n - min_last)
    return list(zip(bounds[:-1], bounds[1:]))


class Generation:
    """State of one call: prompts, sampler, KV store, bindings."""

    def __init__(self, engine: Engine, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
                 eos_ids: list[int], prefill_chunk: int = 512, progress: bool = False):
        self.engine = engine
        self.m = engine.manifest
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling)
        self.eos = torch.tensor(eos_ids or [-1])
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        self.finished = [False] * len(prompts)

    # -- prefill -------------------------------------------------------------------------
    def _new_store(self, batch: int, capacity: int = 0) -> KVStore:
        m = self.m
        return KVStore(m.n_layers, batch, m.n_kv_heads, m.head_dim, self.engine.dtype, self.engine.device, capacity)

    def prefill(self, ids: list[int]) -> tuple[KVStore, Tensor]:
        """Run one prompt through the prefill graph in chunks; returns its store and last logits [1,V]."""
        m, dev = self.m, self.engine.device
        store = self._new_store(1)
        chunks = plan_chunks(len(ids), self.prefill_chunk, m.score_window)
        tokens = torch.tensor(ids, dtype=torch.long, device=dev)
        bar = tqdm(total=len(ids), desc="prefill", unit="tok", disable=not (self.progress and len(chunks) > 1))
        for a, b in chunks:
            s, p = b - a, store.capacity
            outputs = self._outputs(1, s, p + s)
            inputs = {"input_ids": tokens[a:b].unsqueeze(0), "position_ids": torch.arange(a, b, device=dev)[None],
                      "past_mask": store.mask}
            for layer in range(m.n_layers):
                inputs[f"past_key.{layer}"] = store.keys[layer]
                inputs[f"past_value.{layer}"] = store.values[layer]
            binding = self.engine.new_binding("prefill")
            self.engine.bind(binding, inputs, outputs)
            self.engine.run("prefill", binding)
            store.reserve(s)
            store.append(self._layer_outputs(outputs, "key"), self._layer_outputs(outputs, "value"))
            bar.update(s)
        bar.close()
        self.last_outputs = outputs
        return store, outputs["logits"][:, 0]

    def _outputs(self, batch: int, new: int, scored: int) -> dict[str, Tensor]:
        m, dev, dt = self.m, self.engine.device, self.engine.dtype
        out = {"logits": torch.empty(batch, 1, m.vocab_size, device=dev)}
        for layer in range(m.n_layers):
            out[f"key.{layer}"] = torch.empty(batch, m.n_kv_heads, new, m.head_dim, dtype=dt, device=dev)
            out[f"value.{layer}"] = torch.empty(batch, m.n_kv_heads, new, m.head_dim, dtype=dt, device=dev)
        for layer in range(m.n_layers):
            out[f"query.{layer}"] = torch.empty(batch, m.n_heads, m.head_dim, dtype=dt, device=dev)
        for layer in range(m.n_layers):
            out[f"score.{layer}"] = torch.empty(batch, m.n_kv_heads, scored, device=dev)
        return out

    def _layer_outputs(self, outputs: dict[str, Tensor], kind: str) -> list[Tensor]:
        return [outputs[f"{kind}.{layer}"] for layer in range(self.m.n_layers)]

    # -- decode --------------------------------------------------------------------------
    def _bind_decode(self, store: KVStore, batch: int) -> tuple[object, dict[str, Tensor]]:
        m = self.m
        outputs = self._outputs(batch, 1, store.capacity + 1)
        inputs = {"input_ids": self.ids_buf, "position_ids": self.pos_buf, "past_mask": store.mask}
        for layer in range(m.n_layers):
            inputs[f"past_key.{layer}"] = store.keys[layer]
            inputs[f"past_value.{layer}"] = store.values[layer]
        binding = self.engine.new_binding("decode")
        self.engine.bind(binding, inputs, outputs)
        return binding, outputs

    def run(self) -> Iterator[tuple[int, int]]:
        """Yield (sequence index, token) for every generated token, in order."""
        batch, dev = len(self.prompts), self.engine.device
        start = time.perf_counter()
        stores, first_logits = [], []
        for ids in self.prompts:
            store, logits = self.prefill(ids)
            stores.append(store)
            first_logits.append(logits)
        bucket = max(1, min(self.max_new_tokens - 1, DECODE_BUCKET))
        if batch == 1:
            store = stores[0]
            store.reserve(bucket)
        else:
            store = KVStore.merge(stores, bucket)
        del stores
        token = self.sampler(torch.cat(first_logits))
        self.stats.prefill_s = time.perf_counter() - start
        self.ids_buf = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos_buf = torch.tensor([[len(p)] for p in self.prompts], dtype=torch.long, device=dev)
        binding, outputs = self._bind_decode(store, batch)
        decode_start = time.perf_counter()
        for step in range(self.max_new_tokens):
            for b in range(batch):
                if not self.finished[b]:
                    self.stats.new_tokens += 1
                    yield b, int(token[b])
                    if bool((self.eos == token[b].cpu()).any()):
                        self.finished[b] = True
            if all(self.finished) or step == self.max_new_tokens - 1:
                break
            if store.length == store.capacity:
                store.reserve(bucket)
                binding, outputs = self._bind_decode(store, batch)
            self.ids_buf.copy_(token.view(batch, 1))
            self.engine.run("decode", binding)
            store.append(self._layer_outputs(outputs, "key"), self._layer_outputs(outputs, "value"))
            self.pos_buf += 1
            self.stats.decode_steps += 1
            token = self.sampler(outputs["logits"][:, 0])
        self.stats.decode_s = time.perf_counter() - decode_start
        self.stats.kv_bytes = store.nbytes
        self.stats.kv_full_bytes = (self.stats.prompt_tokens + self.stats.new_tokens) * self.m.kv_bytes_per_token

    def stop(self, index: int) -> None:
        """Finish sequence `index` early (a stop string was seen)."""
        self.finished[index] = True
