"""`kvtrt eval`: accuracy of KV specs against the full cache on real text.

Every task prefills each sample once and reuses that prefill (cloned) for the full cache and
every spec, so a spec differs from the reference only by what the KV manager does after it.

- ppl: the next `new_tokens` tokens after an N-token prefix, teacher-forced through decode steps
  with the spec active; perplexity over all samples, and its ratio to the full cache's.
- agreement: greedy continuation of `new_tokens`; fraction of positions equal to the full cache's.
- needle: a pass key hidden at each depth of an N-token haystack, asked for at the end of a
  chat-templated prompt; exact-match accuracy (the key's digits in the answer).

With a `baseline` export of the same model (e.g. the fp32 export when evaluating an int4 one, or
an fp32 KV cache for an fp16 one) rows also carry `baseline_value`, on the same samples: ppl the
baseline's full-cache perplexity; agreement how often this export's full cache picks the baseline
full cache's greedy token; needle the baseline full cache's accuracy. So the table shows what the
export's own precision costs next to what the KV spec costs. With a
`peer_dir` (an onnxruntime-genai model of the same source, as `kvtrt bench --peer` builds it) they
also carry the peer's perplexity on the same samples (`peer_value`): its own weights (e.g. its
int4 re-quantization), graphs and KV cache. With `kvpress=True`, ppl and agreement rows carry kvpress's
counterpart press (see `peers.kvpress_press`) at the same budget on the HF model dequantized from the
export's source, same samples and protocol (prefill compressed by the press, continuation teacher-forced or
greedy on the compressed cache): `peer_value` beside `value`, `peer_full_value` the HF model's own full cache
(agreement is against that full cache's greedy tokens). With an `openvino` model folder (converted by
`peers.build_openvino`), agreement and needle rows carry OpenVINO GenAI's the same way: its pipeline on the
same prompt ids, f32 KV, greedy, with its full cache (`peer_full_value`) and with its own cache eviction for
each spec that has a counterpart (`peers.openvino_counterpart`: snapkv -> its SnapKV, kvcrush:base=snapkv ->
its KVCrush) at kvtrt's kept-token budget rounded down to its 32-token blocks (`peer_budget`, the tokens it
keeps); its pipelines give no logits of given targets, so there is no ppl with it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..runtime.kv.spec import COMPACTION_NAMES, KVSpec, StageText, parse_kv_spec, split_kv_spec
from ..runtime.llm import check_kv_spec, load
from ..runtime.request import RequestStats
from .decoding import decode, prefill
from .peers import (OPENVINO_NO_PPL, KVPressPeer, OpenVINOPeer, kvpress_press, openvino_counterpart, ortgenai_model,
                    ortgenai_nll, press_label)
from .texts import load_texts, token_prefix

TASKS = ("ppl", "agreement", "needle")
NEEDLE = " The secret pass key is {key}. Remember it: {key} is the pass key. "
QUESTION = "\n\nWhat is the secret pass key mentioned in the text above? Reply with the number only."


@dataclass
class SpecRun:
    """One KV spec at one budget (None for the spec's own budget)."""

    spec: KVSpec
    policy: str  # the spec without its budget: the plot's series
    budget: float | int | None

    @property
    def label(self) -> str:
        return str(self.spec)


def expand_specs(kv_specs: list[str], budgets: list[float | int]) -> list[SpecRun]:
    """Each spec once per budget, unless the spec fixes its own budget; 'full' is the reference.

    The budget goes to the compaction stage, or to the retrieval stage when there is none."""
    runs = []
    for text in kv_specs:
        # as written (the budget may come from `budgets`), the compaction stage first
        stages = sorted(split_kv_spec(text), key=lambda s: s.name not in COMPACTION_NAMES)
        if all(s.name == "full" for s in stages):
            parse_kv_spec(text)  # 'full' with options is refused
            continue
        stage = stages[0]  # the budget goes to the compaction stage, else to the retrieval stage
        own = stage.params.get("budget")
        fixed = own is not None or (stage.name == "streaming" and "window" in stage.params)
        policy = _with_options(stages, {k: v for k, v in stage.params.items() if k != "budget"})
        if fixed or not budgets:
            spec = parse_kv_spec(text)
            runs.append(SpecRun(spec, policy, (spec.compaction or spec.retrieval).budget if own else None))
        else:
            runs += [SpecRun(parse_kv_spec(_with_options(stages, {**stage.params, "budget": str(b)})), policy, b)
                     for b in budgets]
    return runs


def _with_options(stages: list[StageText], params: dict[str, str]) -> str:
    """The spec text of ``stages`` with the first stage's options replaced by ``params``."""
    return "+".join([str(StageText(stages[0].name, params)), *map(str, stages[1:])])


@dataclass
class Totals:
    """Accumulated metric of one spec over the samples."""

    nll: float = 0.0
    tokens: int = 0
    hits: int = 0
    trials: int = 0
    kv_bytes: int = 0
    kv_stats: dict = field(default_factory=dict)

    def add_stats(self, stats: RequestStats) -> None:
        self.kv_bytes = max(self.kv_bytes, stats.kv_bytes)
        for key in ("correction_rate", "rerun_rate", "page_hit_rate", "recalled_bytes_per_step"):
            if key in stats.kv:
                self.kv_stats.setdefault(key, []).append(stats.kv[key])


class Evaluator:
    """Runs the tasks for one export at one context length."""

    def __init__(self, directory: str, context: int, texts: str | None = None, num_texts: int = 10,
                 threads: int | None = None, prefill_chunk: int = 512, progress: bool = True, seed: int = 0,
                 baseline: str | None = None, peer_dir: str | None = None, kvpress: bool = False,
                 openvino: str | None = None):
        if kvpress and openvino is not None:
            raise ValueError("one per-spec peer at a time: kvpress or OpenVINO GenAI")
        self.llm = load(directory, threads=threads, prefill_chunk=prefill_chunk, prefix_cache=0)
        self.kvpress = KVPressPeer(self.llm.manifest.source, threads) if kvpress else None
        self.openvino = OpenVINOPeer(openvino, threads, prefill_chunk) if openvino is not None else None
        self.peer_dir = peer_dir
        self.peer = ortgenai_model(peer_dir, threads) if peer_dir is not None else None
        self.baseline = None
        if baseline is not None:
            self.baseline = load(baseline, threads=threads, prefill_chunk=prefill_chunk, prefix_cache=0)
            probe = "The pass key is 12345.\n"
            if self.baseline.manifest.vocab_size != self.llm.manifest.vocab_size or \
                    self.baseline.codec.encode(probe) != self.llm.codec.encode(probe):
                raise ValueError(f"--baseline {baseline} tokenizes differently from {directory}: give an export "
                                 f"of the same model (e.g. its fp32 export)")
        self.context = context
        self.corpus = load_texts(texts)
        self.num_texts = min(num_texts, len(self.corpus))
        self.progress = progress
        self.seed = seed
        limit = self.llm.manifest.max_positions
        if context >= limit:
            raise ValueError(f"--context {context} leaves no room for new tokens in the export's {limit} positions")

    def _rotated(self, i: int) -> list[tuple[str, str]]:
        return self.corpus[i:] + self.corpus[:i]

    def run(self, task: str, runs: list[SpecRun], new_tokens: int | None = None,
            depths: list[float] | None = None) -> list[dict]:
        """Rows `task, kv, policy, budget, context, metric, value, full_value` (one per spec)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if task == "ppl" and self.openvino is not None:
            raise ValueError(OPENVINO_NO_PPL)
        for run in runs:  # budgets that cannot hold sink + window fail now, not an hour in
            check_kv_spec(run.spec, self.llm.manifest)
            if run.spec.compaction is not None:
                run.spec.compaction.budget_tokens(self.context)
        full = SpecRun(KVSpec(), "full", None)
        totals = {r.label: Totals() for r in [full, *runs]}
        base = Totals() if self.baseline is not None else None
        peer = Totals() if self.peer is not None and task == "ppl" else None
        pressed = {r.label: Totals() for r in [full, *runs]} \
            if self.kvpress is not None and task in ("ppl", "agreement") else None
        press_names: dict[str, str] = {}  # run label -> the peer's counterpart (kvpress or OpenVINO)
        peer_fields: dict[str, dict] = {}  # run label -> extra row fields from the peer
        jobs = self._jobs(task, new_tokens, depths)
        if self.openvino is not None:  # OpenVINO GenAI, same samples, one pipeline per cache configuration
            pressed = self._openvino_task(task, jobs, full, runs, press_names, peer_fields)
        bar = tqdm(total=len(jobs) * (len(runs) + 1), desc=f"eval {task}", unit="run", disable=not self.progress)
        for prompt, payload in jobs:
            if base is not None and task == "ppl":  # the baseline export, full cache, same sample
                out = decode(self.baseline, prompt, len(payload), "full", teacher=payload)
                base.nll -= sum(out.logprobs)
                base.tokens += len(payload)
            elif base is not None:
                baseline_tokens = decode(self.baseline, prompt, payload["new"], "full",
                                         stop_at_eos=task == "needle").tokens
            if peer is not None:  # the onnxruntime-genai model, same sample
                peer.nll += ortgenai_nll(self.peer, prompt, payload)
                peer.tokens += len(payload)
            if self.kvpress is not None and pressed is not None:  # kvpress's presses, same sample, same budgets
                self._kvpress_sample(task, prompt, payload, full, runs, pressed, press_names)
            start = prefill(self.llm, prompt)  # one prefill, copied for the full cache and every spec
            outputs = {}
            for run in [full, *runs]:
                total = totals[run.label]
                if task == "ppl":
                    out = decode(self.llm, prompt, len(payload), run.spec, teacher=payload, start=start)
                    total.nll -= sum(out.logprobs)
                    total.tokens += len(payload)
                else:
                    out = decode(self.llm, prompt, payload["new"], run.spec, start=start, stop_at_eos=task == "needle")
                    outputs[run.label] = out.tokens
                total.add_stats(out.stats)
                bar.update()
            if task != "ppl":
                self._score(task, payload, outputs, full.label, totals)
                if base is not None:  # agreement: our full cache against the baseline's; needle: the baseline's
                    mine = {"baseline": baseline_tokens, full.label: outputs[full.label]}
                    self._score(task, payload, mine, "baseline",
                                {"baseline": base if task == "needle" else Totals(),
                                 full.label: base if task == "agreement" else Totals()})
        bar.close()
        rows = [self._row(task, r, totals[r.label], totals[full.label]) for r in [full, *runs]]
        if base is not None:
            for row in rows:
                row["baseline"] = str(self.baseline.directory)
                row["baseline_value"] = self._value(task, base)
        if peer is not None:
            for row in rows:
                row["peer"] = str(self.peer_dir)
                row["peer_value"] = math.exp(peer.nll / peer.tokens)
        if pressed is not None:
            engine = f"kvpress {self.kvpress.version}" if self.openvino is None else \
                f"openvino-genai {self.openvino.version}"
            for run, row in zip([full, *runs], rows):
                row["peer_full_value"] = self._value(task, pressed[full.label])
                name = "full cache" if run is full else press_names.get(run.label)
                row["peer"] = f"{engine} " + (name or "(no counterpart)")
                if name is not None and run.label in pressed:
                    row["peer_value"] = self._value(task, pressed[run.label])
                row.update(peer_fields.get(run.label, {}))
        return rows

    def _kvpress_sample(self, task: str, prompt: list[int], payload, full: SpecRun, runs: list[SpecRun],
                        totals: dict[str, Totals], names: dict[str, str]) -> None:
        """One sample through kvpress: every run with a counterpart press (same kept-token count).
        kvpress compresses the prompt once; a kvtrt run whose `slack` is below the scored tokens
        is compacted again while it decodes, which its peer label says."""
        presses = {}
        scored = len(payload) if task == "ppl" else payload["new"]
        for run in runs:
            policy = run.spec.compaction
            if policy is None or run.spec.retrieval is not None:
                continue
            press = kvpress_press(policy, min(policy.budget_tokens(len(prompt)), len(prompt)), len(prompt))
            if press is not None:
                presses[run.label] = press
                names[run.label] = press_label(press) + ("" if policy.slack >= scored else
                                                         f" [kvtrt re-compacts every {policy.slack} of the {scored} "
                                                         f"tokens, kvpress never: slack={scored} compares alike]")
        if task == "ppl":
            out = self.kvpress.run(prompt, presses, targets=payload)
            for label, nll in [(full.label, out["full"]), *((k, out[k]) for k in presses)]:
                totals[label].nll += nll
                totals[label].tokens += len(payload)
        else:
            out = self.kvpress.run(prompt, presses, new_tokens=payload["new"])
            self._score(task, payload, {full.label: out["full"], **{k: out[k] for k in presses}}, full.label, totals)

    def _openvino_task(self, task: str, jobs: list, full: SpecRun, runs: list[SpecRun], names: dict[str, str],
                       fields: dict[str, dict]) -> dict[str, Totals]:
        """Every sample through OpenVINO GenAI: its full cache and, for every run with a counterpart
        (`openvino_counterpart`) that keeps at most kvtrt's tokens at this context (every prompt is
        `context` tokens), its eviction; one pipeline per configuration, run over all samples. Returns the
        totals of the full cache and those runs."""
        plan: dict[object, list[str]] = {None: [full.label]}  # eviction config (None: full cache) -> run labels
        for run in runs:
            eviction = openvino_counterpart(run.spec, self.context, self.llm.manifest.score_window)
            if eviction is None:
                continue
            keep = min(run.spec.compaction.budget_tokens(self.context), self.context)
            if eviction.tokens > keep:  # below its smallest cache: it would keep more than kvtrt
                fields[run.label] = {"peer_note": f"no counterpart at {keep} tokens: OpenVINO's smallest "
                                                  f"{eviction.mode} cache keeps {eviction.tokens}"}
                continue
            names[run.label] = eviction.label
            fields[run.label] = {"peer_budget": eviction.tokens}
            plan.setdefault(eviction, []).append(run.label)
        new = jobs[0][1]["new"] if jobs else 0
        stop = list(self.llm.manifest.eos_token_ids) if task == "needle" else None
        outputs: list[dict[str, list[int]]] = [{} for _ in jobs]
        for eviction, labels in tqdm(plan.items(), desc=f"eval {task} openvino", unit="config",
                                     disable=not self.progress):
            tokens = self.openvino.generate([prompt for prompt, _ in jobs], new, eviction, stop_ids=stop)
            for out, ids in zip(outputs, tokens):
                out.update({label: ids for label in labels})
        totals = {label: Totals() for label in [full.label, *names]}
        for (_, payload), out in zip(jobs, outputs):
            self._score(task, payload, out, full.label, totals)
        return totals

    def _score(self, task: str, payload: dict, outputs: dict[str, list[int]], reference: str,
               totals: dict[str, Totals]) -> None:
        """One sample's generated tokens per run label: agreement with the `reference` label's tokens
        (the same engine's full cache), or needle hits (the key's digits in the decoded answer)."""
        for label, tokens in outputs.items():
            total = totals[label]
            if task == "agreement":
                total.hits += sum(a == b for a, b in zip(tokens, outputs[reference]))
                total.trials += len(outputs[reference])
            else:
                total.hits += int(payload["key"] in self.llm.codec.decode(tokens))
                total.trials += 1

    @staticmethod
    def _value(task: str, total: Totals) -> float:
        return math.exp(total.nll / total.tokens) if task == "ppl" else total.hits / max(total.trials, 1)

    def _jobs(self, task: str, new_tokens: int | None, depths: list[float] | None) -> list[tuple[list[int], object]]:
        encode, n = self.llm.codec.encode, self.context
        if task == "ppl":
            m = new_tokens or 256
            if n + m > self.llm.manifest.max_positions:
                raise ValueError(f"--context {n} + {m} scored tokens exceed the export's positions")
            jobs = []
            for i in range(self.num_texts):
                ids = token_prefix(encode, self._rotated(i), n + m)
                jobs.append((ids[:n], ids[n:]))
            return jobs
        if task == "agreement":
            m = new_tokens or 64
            return [(token_prefix(encode, self._rotated(i), n), {"new": m}) for i in range(self.num_texts)]
        return self._needle_jobs(depths or [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])

    def _needle_jobs(self, depths: list[float]) -> list[tuple[list[int], dict]]:
        codec = self.llm.codec
        head, tail = codec.render_chat([{"role": "user", "content": "\x00"}]).split("\x00")
        head_ids = codec.tokenizer.encode(head, add_special_tokens=False).ids
        tail_ids = codec.tokenizer.encode(QUESTION + tail, add_special_tokens=False).ids
        rng = random.Random(self.seed)
        jobs = []
        for i in range(self.num_texts):
            for depth in depths:
                key = str(rng.randint(10000, 99999))
                needle = codec.tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False).ids
                room = self.context - len(head_ids) - len(tail_ids) - len(needle)
                if room < 16:
                    raise ValueError(f"--context {self.context} leaves {room} tokens of haystack around the needle "
                                     f"and question ({self.context - room} tokens); use --context "
                                     f"{self.context - room + 16} or more")
                hay = token_prefix(codec.encode, self._rotated(i), room)
                at = _sentence_end(codec, hay, int(depth * len(hay)))
                start = len(head_ids) + at  # the needle's tokens: [start, start + len(needle))
                jobs.append((head_ids + hay[:at] + needle + hay[at:] + tail_ids,
                             {"new": 24, "key": key, "depth": depth, "span": [start, start + len(needle)]}))
        return jobs

    def _row(self, task: str, run: SpecRun, total: Totals, reference: Totals) -> dict:
        if task == "ppl":
            value, full_value, metric = math.exp(total.nll / total.tokens), math.exp(reference.nll / reference.tokens), \
                "perplexity"
        else:
            value = total.hits / max(total.trials, 1)
            full_value = reference.hits / max(reference.trials, 1)
            metric = "agreement" if task == "agreement" else "needle_accuracy"
        row = {"task": task, "kv": run.label, "policy": run.policy, "budget": run.budget, "context": self.context,
               "metric": metric, "value": value, "full_value": full_value, "samples": self.num_texts,
               "kv_mib": total.kv_bytes / 2**20}
        row.update({k: sum(v) / len(v) for k, v in total.kv_stats.items()})
        return row


def _sentence_end(codec, ids: list[int], at: int) -> int:
    """The first token boundary at or after `at` that follows a sentence end (else `at`)."""
    for j in range(at, min(len(ids), at + 200)):
        if codec.decode(ids[j - 1:j]).rstrip().endswith((".", "!", "?")):
            return j
    return at


def table(rows: list[dict]) -> str:
    """Markdown table of eval rows. A peer with per-spec values (kvpress, OpenVINO GenAI) gets its value, its
    ratio to its own full cache and kvtrt's value over it; a full-cache peer (ortgenai) and a baseline get theirs."""
    if any("peer_full_value" in r for r in rows):
        return _press_table(rows)
    others = [name for name in ("baseline", "peer") if any(f"{name}_value" in r for r in rows)]
    lines = ["| task | kv | budget | metric | value | full cache | ratio | KV MiB | correction rate |"
             + "".join(f" {name} full cache | vs {name} |" for name in others),
             "|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(others)]
    for r in rows:
        ratio = r["value"] / r["full_value"] if r["full_value"] else float("nan")
        corr = f"{r['correction_rate']:.3f}" if "correction_rate" in r else ""
        if r.get("rerun_rate"):
            corr += f" (steps run twice: {r['rerun_rate']:.3f})"
        line = (f"| {r['task']} | {r['kv']} | {r['budget'] if r['budget'] is not None else ''} | {r['metric']} | "
                f"{r['value']:.4f} | {r['full_value']:.4f} | {ratio:.4f} | {r['kv_mib']:.1f} | {corr} |")
        for name in others:
            b = r.get(f"{name}_value")
            if not b:
                line += " | |"
            else:  # a ratio of perplexities; agreement and needle baselines are shown as they are
                line += f" {b:.4f} | {r['value'] / b:.4f} |" if r["task"] == "ppl" else f" {b:.4f} | |"
        lines.append(line)
    return "\n".join(lines)


def _press_table(rows: list[dict]) -> str:
    """Rows with a per-spec peer (kvpress, OpenVINO GenAI): its counterpart, value, full cache, ratio and
    kvtrt's value over the peer's, plus the tokens the peer keeps when it says (`peer_budget`)."""
    engine = rows[0].get("peer", "peer").split(" ")[0]
    budgets = any("peer_budget" in r for r in rows)
    lines = [f"| task | kv | budget | metric | kvtrt | full cache | ratio | {engine} counterpart | "
             + f"{engine} tokens kept | " * budgets
             + f"{engine} | {engine} full cache | {engine} ratio | kvtrt / {engine} |",
             "|---|---|---|---|---|---|---|---|" + "---|" * budgets + "---|---|---|---|"]
    for r in rows:
        ratio = r["value"] / r["full_value"] if r["full_value"] else float("nan")
        peer, peer_full = r.get("peer_value"), r["peer_full_value"]
        press = r.get("peer", "").split(" ", 2)[-1]
        line = (f"| {r['task']} | {r['kv']} | {r['budget'] if r['budget'] is not None else ''} | {r['metric']} | "
                f"{r['value']:.4f} | {r['full_value']:.4f} | {ratio:.4f} | {press} | ")
        if budgets:
            line += f"{r.get('peer_budget', '')} | "
        if peer is None:
            line += f" | {peer_full:.4f} | | |"
        else:
            vs = f"{r['value'] / peer:.4f}" if peer else ""
            line += f"{peer:.4f} | {peer_full:.4f} | {peer / peer_full if peer_full else float('nan'):.4f} | {vs} |"
        lines.append(line)
    return "\n".join(lines)
