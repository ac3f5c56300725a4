"""The embeddable API: `llm = kvtrt.load(dir); llm.generate(prompt)`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

from ..manifest import Manifest
from .engine import OrtEngine
from .generator import Generation, GenerationStats, check_kv_spec, decode_graphs
from .kv.spec import KVSpec, parse_kv_spec
from .sampling import SamplingParams
from .tokenizer import Messages, StreamDecoder, TextCodec

Prompt = Union[str, Messages, Sequence[int]]


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens exceed the export's max positions."""


@dataclass
class GenerationResult:
    """What one prompt produced."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    stats: GenerationStats


class LLM:
    """A loaded export. Thread-safe: each call owns its sequence state, the engine is shared."""

    def __init__(self, directory: str | os.PathLike, provider: str = "cpu", kv: str | KVSpec = "full",
                 threads: int | None = None, prefill_chunk: int = 512, backend: str = "onnxruntime",
                 torch_threads: int | None = 1):
        if torch_threads is not None:
            # the KV manager's torch ops are small (page copies, scoring); with torch's own thread
            # pool next to the engine's, the 2-core hosts this was built on oversubscribe and
            # every small op slows down many times over
            import torch

            torch.set_num_threads(torch_threads)
        self.directory = directory
        self.manifest = Manifest.load(directory)
        self.kv = parse_kv_spec(kv)
        check_kv_spec(self.kv, self.manifest)
        if backend == "onnxruntime":
            self.engine = OrtEngine(directory, self.manifest, provider=provider, threads=threads,
                                    variants=decode_graphs(self.kv, self.manifest))
        elif backend == "tensorrt":
            from .trt_engine import TrtEngine  # GPU only, `trt` extra

            self.engine = TrtEngine(directory, self.manifest)
        else:
            raise ValueError(f"backend {backend!r} is unknown; use 'onnxruntime' or 'tensorrt'")
        self.codec = TextCodec(directory, self.manifest)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: text (chat-templated when `chat`), messages, or ids."""
        if isinstance(prompt, str):
            return self.codec.encode_chat([{"role": "user", "content": prompt}]) if chat else self.codec.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.codec.encode_chat(list(prompt))
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < self.manifest.vocab_size for t in ids):
            raise ValueError(f"token ids must be in [0, {self.manifest.vocab_size})")
        return ids

    def _fit(self, ids: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        limit = self.manifest.max_positions
        if not ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens >= limit:
            raise PromptTooLongError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                     f"{limit} positions; ask for fewer new tokens")
        if len(ids) + max_new_tokens > limit:
            if not truncate:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the export's {limit} "
                    f"positions; shorten the prompt, lower max_new_tokens, or pass truncate=True (--truncate) "
                    f"to keep the last {limit - max_new_tokens} prompt tokens")
            ids = ids[len(ids) + max_new_tokens - limit:]
        return ids

    # -- generation ------------------------------------------------------------------------
    def _generation(self, prompts: list[Prompt], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    seed: int, chat: bool | None, truncate: bool, progress: bool) -> Generation:
        ids = [self._fit(self.encode(p, chat), max_new_tokens, truncate) for p in prompts]
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        return Generation(self.engine, ids, max_new_tokens, sampling, self.manifest.eos_token_ids,
                          self.prefill_chunk, progress=progress, kv=self.kv)

    def generate(self, prompt: Prompt | list[Prompt], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                 chat: bool | None = None, truncate: bool = False,
                 progress: bool = False) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt, or for a list of prompts as one batch (a list of results).

        `prompt` is text, chat messages (`[{"role": ..., "content": ...}]`) or token ids; `chat=True`
        wraps text in the chat template. temperature 0 is greedy. Generation ends at EOS, at a
        `stop` string (not included in the text), or after `max_new_tokens`.
        """
        batched = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], (dict, int))
        prompts = list(prompt) if batched else [prompt]
        gen = self._generation(prompts, max_new_tokens, temperature, top_k, top_p, seed, chat, truncate, progress)
        tokens: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        for index, token in gen.run():
            if token in self.manifest.eos_token_ids:
                reasons[index] = "eos"
                continue
            tokens[index].append(token)
            if stop and any(s in self.codec.decode(tokens[index]) for s in stop):
                reasons[index] = "stop"
                gen.stop(index)
        results = []
        for index, ids in enumerate(tokens):
            text = self.codec.decode(ids)
            if reasons[index] == "stop":
                text = text[:min(text.find(s) for s in stop if s in text)]
            results.append(GenerationResult(text, ids, gen.prompts[index], reasons[index], gen.stats))
        return results if batched else results[0]

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), chat: bool | None = None,
               truncate: bool = False, progress: bool = False) -> Iterator[str]:
        """Yield text pieces as they decode (one prompt). After the loop, `self.last_stats` holds
        the call's stats (per thread: use `generate` when several threads stream at once)."""
        gen = self._generation([prompt], max_new_tokens, temperature, top_k, top_p, seed, chat, truncate, progress)
        decoder = StreamDecoder(self.codec)
        keep = max(map(len, stop), default=1) - 1  # a tail that could still be the start of a stop string
        yielded, pending, done = "", "", False
        tokens = gen.run()
        while not done:
            token = next(tokens, None)
            if token is None or token[1] in self.manifest.eos_token_ids:
                pending += decoder.flush()
                done = True
            else:
                pending += decoder.push(token[1])
            full = yielded + pending
            hits = [full.find(s) for s in stop if s in full]
            if hits:
                pending, done = full[len(yielded):min(hits)], True
                gen.stop(0)
            cut = len(pending) if done else len(pending) - keep
            if cut > 0:
                yield pending[:cut]
                yielded, pending = yielded + pending[:cut], pending[cut:]
        for _ in tokens:  # let the loop finish its bookkeeping (it ends at once: the sequence is finished)
            pass
        self.last_stats = gen.stats


def load(directory: str | os.PathLike, provider: str = "cpu", kv: str | KVSpec = "full", threads: int | None = None,
         prefill_chunk: int = 512, backend: str = "onnxruntime", torch_threads: int | None = 1) -> LLM:
    """Load an export folder made by `kvtrt export`.

    provider: "cpu", "cuda" or "tensorrt" (ONNX Runtime execution provider); kv: KV spec (see the
    README); threads: engine intra-op threads (default all cores); prefill_chunk: prompt tokens per
    prefill call; torch_threads: torch threads for the KV manager (process-wide; None leaves it)."""
    return LLM(directory, provider=provider, kv=kv, threads=threads, prefill_chunk=prefill_chunk, backend=backend,
               torch_threads=torch_threads)
