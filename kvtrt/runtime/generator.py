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
from .kv.policies import SnapKVPolicy
from .kv.spec import KVSpec, KVSpecError
from .kv.store import KVStore
from .sampling import Sampler, SamplingParams

DECODE_BUCKET = 256  # slots added at a time while decoding (one reallocation per bucket)
COMPACTION_SLACK = 64  # tokens a compacted cache may grow past its budget before it is compacted again


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
    compactions: int = 0
    kv: dict = field(default_factory=dict)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the prefill (the first token comes from its logits)."""
        return self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (per sequence)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def check_kv_spec(kv: KVSpec, manifest) -> None:
    """Refuse a SnapKV observation window the export's score outputs were not made with (the
    spec's own options were checked when it was parsed)."""
    policy = kv.compaction
    base = getattr(policy, "base", policy)
    if isinstance(base, SnapKVPolicy) and policy.given("window") \
            and base.window != manifest.score_window:
        raise KVSpecError(f"snapkv window={base.window} differs from the export's --score-window "
                          f"{manifest.score_window}; use window={manifest.score_window} or re-export with "
                          f"--score-window {base.window}")


def decode_graphs(kv: KVSpec, manifest) -> list[str]:
    """The graphs a runtime with this KV spec loads up front: prefill and its decode variant. The
    full cache and retrieval views decode in place (`decode_shared`) when the export has that
    graph; compaction needs the decode graph's scores. (A compacted cache too short to engage
    retrieval decodes with `decode`, loaded on first use.)"""
    shared = (kv.is_full or kv.retrieval is not None) and "decode_shared" in manifest.graphs
    prefill = "prefill_shared" if "prefill_shared" in manifest.graphs else "prefill"
    return [prefill, "decode_shared" if shared else "decode"]


def plan_chunks(n: int, chunk: int, min_last: int) -> list[tuple[int, int]]:
    """Split [0, n) into chunks of `chunk` tokens whose last one has at least `min_last` tokens
    (when n allows), so the graph's score window sees the last `min_last` prompt queries."""
    bounds = list(range(0, n, chunk)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_last:
        bounds[-2] = max(bounds[-3] + 1, n - min_last)
    return list(zip(bounds[:-1], bounds[1:]))


class Generation:
    """State of one call: prompts, sampler, KV store or retrieval views, bindings.

    The KV spec decides the decode loop: the full cache and compaction policies decode from the
    dense `KVStore` (compacting it after prefill and whenever it outgrows budget + slack);
    retrieval (`freekv`, `quest`) decodes from the two fixed view buffers of `FreeKVRetrieval`,
    after an optional compaction of the prompt (KVCrush decides what is stored, FreeKV what is
    attended).
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
                 eos_ids: list[int], prefill_chunk: int = 512, progress: bool = False, kv: KVSpec | None = None,
                 teacher: list[list[int]] | None = None, keep_logits: bool = False,
                 prefilled: list[tuple[KVStore, Tensor, list[Tensor]]] | None = None):
        self.engine = engine
        self.m = engine.manifest
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling)
        self.eos = torch.tensor(eos_ids or [-1])
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        self.kv = kv or KVSpec()
        self.policy = self.kv.compaction
        self.retrieval = self.kv.retrieval
        self.keep = [self.policy.budget_tokens(len(p)) for p in prompts] if self.policy else None
        self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        self.finished = [False] * len(prompts)
        # teacher forcing (evaluation): feed these tokens instead of sampling, record their log-probs
        self.teacher = torch.tensor(teacher, dtype=torch.long) if teacher is not None else None
        if self.teacher is not None and self.teacher.shape != (len(prompts), max_new_tokens):
            raise ValueError("teacher tokens must be [batch, max_new_tokens]")
        self.target_logprobs: list[Tensor] = []  # per step [B]
        self.keep_logits = keep_logits
        self.step_logits: list[Tensor] = []  # per step [B,V] when keep_logits
        # prefill results to start from (evaluation reuses one prefill for many KV specs); consumed
        self.prefilled = prefilled

    # -- prefill -------------------------------------------------------------------------
    def _new_store(self, batch: int, track_scores: bool) -> KVStore:
        m = self.m
        return KVStore(m.n_layers, batch, m.n_kv_heads, m.head_dim, self.engine.dtype, self.engine.device,
                       track_scores=track_scores)

    def prefill(self, ids: list[int], track_scores: bool | None = None) -> tuple[KVStore, Tensor, list[Tensor]]:
        """Run one prompt through the prefill graph in chunks.

        Returns its store (with the last chunk's attention mass per slot when a policy needs it, or
        `track_scores`), the last logits [1,V] and the last prompt query of every layer [1,H,D].
        With a `prefill_shared` graph the store is allocated once and every chunk writes its K/V
        into it in place; otherwise the store grows by each chunk's `key`/`value` outputs."""
        m, dev = self.m, self.engine.device
        store = self._new_store(1, track_scores=bool(track_scores) or self.policy is not None)
        shared = "prefill_shared" in m.graphs
        if shared:
            store.reserve(len(ids))
        chunks = plan_chunks(len(ids), self.prefill_chunk, m.score_window)
        tokens = torch.tensor(ids, dtype=torch.long, device=dev)
        bar = tqdm(total=len(ids), desc="prefill", unit="tok", disable=not (self.progress and len(chunks) > 1))
        for i, (a, b) in enumerate(chunks):
            s = b - a
            last = i == len(chunks) - 1  # its last queries are the observation window
            # score rows: the window on the last chunk; one row elsewhere (its score is not used)
            rows = torch.arange(max(0, s - m.score_window) if last else s - 1, s, device=dev)
            inputs = {"input_ids": tokens[a:b].unsqueeze(0), "position_ids": torch.arange(a, b, device=dev)[None],
                      "past_mask": store.mask, "score_queries": rows}
            if shared:
                inputs["write_slot"] = torch.tensor(store.claim(s), device=dev)
                outputs = self._outputs(1, s, store.length, cache=(store.keys, store.values))
            else:
                outputs = self._outputs(1, s, store.capacity + s)
            for layer in range(m.n_layers):
                inputs[f"past_key.{layer}"] = store.keys[layer]
                inputs[f"past_value.{layer}"] = store.values[layer]
            variant = "prefill_shared" if shared else "prefill"
            binding = self.engine.new_binding(variant)
            self.engine.bind(binding, inputs, outputs)
            self.engine.run(variant, binding)
            del inputs, binding  # let reserve() free each old layer as it copies it (peak: store + 1 layer)
            if shared:
                if last:
                    store.add_scores(self._layer_outputs(outputs, "score"))
            else:
                store.reserve(s)
                store.append(self._layer_outputs(outputs, "key"), self._layer_outputs(outputs, "value"),
                             self._layer_outputs(outputs, "score") if last else None)
            bar.update(s)
        bar.close()
        return store, outputs["logits"][:, 0], self._layer_outputs(outputs, "query")

    def _outputs(self, batch: int, new: int, scored: int | None,
                 cache: tuple[list[Tensor], list[Tensor]] | None = None) -> dict[str, Tensor]:
        """Output buffers of one graph call: logits, the new tokens' `key`/`value` (or, for the
        in-place graphs, `present_key`/`present_value` bound to the `cache` buffers), `query`, and
        `score` over `scored` slots (none when `scored` is None)."""
        m, dev, dt = self.m, self.engine.device, self.engine.dtype
        out = {"logits": torch.empty(batch, 1, m.vocab_size, device=dev)}
        for layer in range(m.n_layers):
            if cache is None:
                out[f"key.{layer}"] = torch.empty(batch, m.n_kv_heads, new, m.head_dim, dtype=dt, device=dev)
                out[f"value.{layer}"] = torch.empty(batch, m.n_kv_heads, new, m.head_dim, dtype=dt, device=dev)
            else:
                out[f"present_key.{layer}"], out[f"present_value.{layer}"] = cache[0][layer], cache[1][layer]
        for layer in range(m.n_layers):
            out[f"query.{layer}"] = torch.empty(batch, m.n_heads, m.head_dim, dtype=dt, device=dev)
        if scored is not None:
            for layer in range(m.n_layers):
                out[f"score.{layer}"] = torch.empty(batch, m.n_kv_heads, scored, device=dev)
        return out

    def _layer_outputs(self, outputs: dict[str, Tensor], kind: str) -> list[Tensor]:
        return [outputs[f"{kind}.{layer}"] for layer in range(self.m.n_layers)]

    # -- compaction ----------------------------------------------------------------------
    def _compact(self, store: KVStore, extra: int) -> None:
        """Shrink every sequence of `store` to its budget with the policy (per layer, per KV head)."""
        live = [torch.nonzero(store.mask[b], as_tuple=True)[0] for b in range(store.batch)]
        counts = [min(self.keep[b], len(live[b])) for b in range(store.batch)]
        k = max(counts)
        slots = []
        for layer in range(self.m.n_layers):
            chosen = torch.zeros(store.batch, self.m.n_kv_heads, k, dtype=torch.long, device=store.device)
            for b in range(store.batch):
                mass = store.scores[layer][b][:, live[b]]
                chosen[b, :, k - counts[b]:] = live[b][self.policy.select(mass, counts[b])]
            slots.append(chosen)
        store.compact(slots, counts, extra)
        self.stats.compactions += 1

    # -- decode --------------------------------------------------------------------------
    def _bind(self, past_keys: list[Tensor], past_values: list[Tensor], mask: Tensor,
              outputs: dict[str, Tensor]):
        inputs = {"input_ids": self.ids_buf, "position_ids": self.pos_buf, "past_mask": mask}
        for layer in range(self.m.n_layers):
            inputs[f"past_key.{layer}"] = past_keys[layer]
            inputs[f"past_value.{layer}"] = past_values[layer]
        binding = self.engine.new_binding("decode")
        self.engine.bind(binding, inputs, outputs)
        return binding

    def run(self) -> Iterator[tuple[int, int]]:
        """Yield (sequence index, token id) for every generated token, in order."""
        batch, dev = len(self.prompts), self.engine.device
        start = time.perf_counter()
        stores, first_logits, queries = [], [], []
        bucket = max(1, min(self.max_new_tokens - 1, DECODE_BUCKET))
        for b, ids in enumerate(self.prompts):
            store, logits, query = self.prefilled[b] if self.prefilled else self.prefill(ids)
            if self.policy is not None and store.length > self.keep[b]:
                self._compact(store, 0)
            stores.append(store)
            first_logits.append(logits)
            queries.append(query)
        store = KVStore.merge(stores, 0) if batch > 1 else stores[0]
        del stores
        self.prefilled = None
        token = self._choose(torch.cat(first_logits), 0)
        self.stats.prefill_s = time.perf_counter() - start
        self.ids_buf = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.slot_buf = torch.zeros((), dtype=torch.long, device=dev)  # write_slot of the in-place graph
        self.pos_buf = torch.tensor([[len(p)] for p in self.prompts], dtype=torch.long, device=dev)
        held = int(store.mask.sum(1).max())  # tokens stored per sequence (after any compaction)
        engaged = self.retrieval is not None and self.retrieval.engages(held)
        if self.retrieval is not None and not engaged:  # short cache: dense decode, said in the stats
            self.stats.kv = {"retrieval_engaged": 0, "retrieval_min_context": self.retrieval.threshold(held)}
        if engaged:
            query = [torch.cat([q[layer] for q in queries]) for layer in range(self.m.n_layers)]
            steps = self._decode_retrieval(store, query, token)
        else:
            steps = self._decode_store(store, token, bucket)
        del store  # the decode owns the cache now (retrieval drops it once its pool is built)
        yield from steps
        self.stats.kv_full_bytes = (self.stats.prompt_tokens + self.stats.new_tokens) * self.m.kv_bytes_per_token

    def _choose(self, logits: Tensor, step: int) -> Tensor:
        """The next token of every sequence: sampled, or the teacher's (recording its log-prob)."""
        if self.keep_logits:
            self.step_logits.append(logits.clone())
        if self.teacher is None:
            return self.sampler(logits)
        token = self.teacher[:, step].to(logits.device)
        self.target_logprobs.append(torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0].cpu())
        return token

    def _emit(self, token: Tensor, step: int) -> Iterator[tuple[int, int]]:
        """Yield this step's token of every unfinished sequence; sets `self.done` when the call ends."""
        for b in range(len(self.prompts)):
            if not self.finished[b]:
                self.stats.new_tokens += 1
                yield b, int(token[b])
                if bool((self.eos == token[b].cpu()).any()):
                    self.finished[b] = True
        self.done = all(self.finished) or step == self.max_new_tokens - 1

    def _decode_store(self, store: KVStore, token: Tensor, bucket: int) -> Iterator[tuple[int, int]]:
        batch = store.batch
        slack = COMPACTION_SLACK
        shared = self.policy is None and "decode_shared" in self.m.graphs  # policies need the scores
        store.reserve(slack if self.policy is not None else bucket)
        binding, outputs = self._store_binding(store, shared)
        t0 = time.perf_counter()
        for step in range(self.max_new_tokens):
            yield from self._emit(token, step)
            if self.done:
                break
            if store.length == store.capacity:
                if self.policy is not None:
                    self._compact(store, slack)
                else:
                    store.reserve(bucket)
                binding, outputs = self._store_binding(store, shared)
            self.ids_buf.copy_(token.view(batch, 1))
            if shared:
                self.slot_buf.fill_(store.claim())
                self.engine.run("decode_shared", binding)  # writes the new K/V into the claimed slot
            else:
                self.engine.run("decode", binding)
                store.append(self._layer_outputs(outputs, "key"), self._layer_outputs(outputs, "value"),
                             self._layer_outputs(outputs, "score") if self.policy is not None else None)
            self.pos_buf += 1
            self.stats.decode_steps += 1
            token = self._choose(outputs["logits"][:, 0], step + 1)
            self.stats.kv_bytes = max(self.stats.kv_bytes, store.nbytes)
        self.stats.decode_s = time.perf_counter() - t0
        self.stats.kv_bytes = max(self.stats.kv_bytes, store.nbytes)

    def _store_binding(self, store: KVStore, shared: bool):
        """Binding and outputs of a decode step over the store's current buffers: the `decode`
        graph (new K/V as outputs, appended by the runtime), or `decode_shared` (the store's
        buffers are both past and present; the graph writes the slot in `write_slot`)."""
        if shared:
            return self._bind_shared(store.keys, store.values, store.mask)
        outputs = self._outputs(store.batch, 1, store.capacity + 1)
        return self._bind(store.keys, store.values, store.mask, outputs), outputs

    def _bind_shared(self, keys: list[Tensor], values: list[Tensor], mask: Tensor):
        """Binding and outputs of `decode_shared` over `keys`/`values` (both past and present;
        the graph writes the new K/V at `self.slot_buf`)."""
        outputs = self._outputs(mask.shape[0], 1, None, cache=(keys, values))
        inputs = {"input_ids": self.ids_buf, "position_ids": self.pos_buf, "past_mask": mask,
                  "write_slot": self.slot_buf}
        for layer in range(self.m.n_layers):
            inputs[f"past_key.{layer}"], inputs[f"past_value.{layer}"] = keys[layer], values[layer]
        binding = self.engine.new_binding("decode_shared")
        self.engine.bind(binding, inputs, outputs)
        return binding, outputs

    def _decode_retrieval(self, store: KVStore, query: list[Tensor], token: Tensor) -> Iterator[tuple[int, int]]:
        batch, m = store.batch, self.m
        context = max(len(p) for p in self.prompts)
        # in place when the export can: each view gets a staging slot the graph writes the new K/V to
        shared = "decode_shared" in m.graphs
        r = self.retrieval.create(m.n_layers, m.n_kv_heads, m.n_heads, m.head_dim, batch, self.engine.dtype,
                                  device=self.engine.device, mask_dtype=torch.long, max_context=context,
                                  staging_slot=shared)
        try:
            t0 = time.perf_counter()
            r.start(store.keys, store.values, query, mask=store.mask, reserve_tokens=self.max_new_tokens, release=True)
            del store
            self.stats.prefill_s += time.perf_counter() - t0  # building the pool is part of the prompt's cost
            # per view: binding, outputs, and where its step's query and new K/V are read from
            bound = []
            self.slot_buf.fill_(r.slots)  # decode_shared writes the new K/V into each view's staging slot
            plain_outputs = None if shared else self._outputs(batch, 1, r.slots + 1)  # one set for both views
            for v in r.views:
                if shared:
                    binding, outputs = self._bind_shared(v.keys, v.values, v.mask)
                    new_k, new_v = v.all_keys[:, :, :, r.slots:], v.all_values[:, :, :, r.slots:]  # staging slot
                else:
                    outputs = plain_outputs
                    binding = self._bind(v.keys, v.values, v.mask, outputs)
                    new_k, new_v = self._layer_outputs(outputs, "key"), self._layer_outputs(outputs, "value")
                bound.append((binding, outputs, self._layer_outputs(outputs, "query"), new_k, new_v))
            variant = "decode_shared" if shared else "decode"
            t0 = time.perf_counter()
            for step in range(self.max_new_tokens):
                yield from self._emit(token, step)
                if self.done:
                    break
                self.ids_buf.copy_(token.view(batch, 1))
                binding, outputs, new_q, new_k, new_v = bound[r.view().index]
                if r.mode == "quest":  # select with the current query: probe, re-select, run again
                    self.engine.run(variant, binding)
                    r.select(new_q)
                else:
                    r.prefetch()
                self.engine.run(variant, binding)
                r.finish_step(new_q, new_k, new_v)
                self.pos_buf += 1
                self.stats.decode_steps += 1
                token = self._choose(outputs["logits"][:, 0], step + 1)
            self.stats.decode_s = time.perf_counter() - t0
            self.stats.kv_bytes = r.nbytes
            self.stats.kv = {"retrieval_engaged": 1,
                             **{k: v for k, v in r.stats().as_dict().items() if isinstance(v, (int, float))}}
        finally:
            r.close()

    def stop(self, index: int) -> None:
        """Finish sequence `index` early (a stop string was seen)."""
        self.finished[index] = True
