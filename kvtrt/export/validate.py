"""Check an export's graphs against the PyTorch reference with Polygraphy.

What it does, in order:

1. **Lint** every graph with `polygraphy check lint` (a subprocess: onnx.checker plus a node-by-node
   ONNX Runtime run on the validation inputs); errors fail validation.
2. **Golden outputs.** The reference is rebuilt from the Hugging Face model named in
   `manifest.source` (or passed in as `reference_model=`, e.g. for tests' in-memory models): the
   kvtrt adapter module (`kvtrt.models.get_adapter(model_type).build(...)`, the exact forward the
   export traced, run in PyTorch fp32) gives every output, and HF transformers itself gives the
   logits. For an int4 export the adapter is rebuilt with the export's dequantized weights
   (`kvtrt.export.quantize.dequantized_weights`), so the check isolates the graph, and HF logits are
   skipped (they differ by the quantization error itself, which perplexity measures). Since that
   reference comes from the export's own int4 weights, a quantized export also gets a **weight
   check**: every dequantized weight must lie within its block's rounding bound of the float model
   (`check_quantized_weights`), which is what catches corrupted int4 data.
   Cases, batch 2 each: prefill with no past (S>1, P=0), prefill after a past (S>1, P>0), decode
   after a past (S=1), and decode with some past slots masked out (`past_mask` 0; reference only).
   Past K/V come from the reference's own earlier outputs, so each case checks one graph call.
   Inputs are saved in Polygraphy's `--load-inputs` JSON and the goldens as Polygraphy `RunResults`
   (`--load-outputs`), one pair per graph, with a `polygraphy_run.sh` that replays the comparison
   from the command line.
3. **Compare** with Polygraphy: ONNX Runtime runs each graph (`OnnxrtRunner`) on those inputs and
   `Comparator.compare_accuracy` with `SimpleCompareFunc` (= `CompareFunc.simple`) checks it
   against each reference. Tolerances (`TOLERANCES`), elementwise unless noted (an element fails
   when it exceeds both atol and rtol):
   - fp32: atol 1e-4 / rtol 1e-3 (HF logits atol 2e-4: its SDPA kernel sums in another order).
     Measured on SmolLM2: max abs 7.4e-5 (logits), 8.6e-5 (values), 1.6e-6 (scores).
   - fp16 (weights, or only the KV cache: `--kv-dtype fp16`; an int4 export with an fp16 cache
     takes the int4-int8 row below whatever its accuracy_level) against the fp32 reference: key/value atol 1.5e-1, logits 1e-1, query/score 2e-2 (rtol
     5e-2; logits 2e-2). Measured on SmolLM2 fp16 (ORT CPU): max abs 0.10 on keys/values (layers
     12-20 at P=0, magnitudes ~3, i.e. fp16's ~3% after 30 layers; mean abs 2e-3), 0.033 on logits,
     1.9e-3 on queries, 8e-4 on scores.
   - int4 with fp32 compute (accuracy_level 0/1) against its dequantized reference: atol 1e-3 /
     rtol 1e-2 (measured max abs 2.4e-4 on SmolLM2).
   - int4 with int8 activations (accuracy_level 2-4, the default 4) or fp16: MatMulNBits
     quantizes activations per block, an error that is noise-like but not small elementwise
     (SmolLM2: max abs 1.1 on logits, 0.7 on keys). These are checked on the **mean** absolute
     error instead: logits 0.5, key/value 0.1, query/score 0.01 (measured means 0.35, 0.044/0.069,
     0.005/0.006). Perplexity is the quality check for quantization itself (kvtrt/export/quantize.py).

The result is a table per output (grouped by kind, the worst layer named; every failing output is
listed by name), a JSON report with `--json OUT`, and exit code 1 when anything fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..contract import GraphVariant, output_names, past_names
from ..manifest import Manifest

#: per export kind: the polygraphy error statistic ("stat") and (atol, rtol) per output kind ("" =
#: default; "hf" = the HF-transformers logits comparison). See the module docstring for the numbers.
TOLERANCES: dict[str, dict] = {
    "fp32": {"stat": "elemwise", "": (1e-4, 1e-3), "hf": (2e-4, 1e-3)},
    "fp16": {"stat": "elemwise", "": (2e-2, 5e-2), "key": (1.5e-1, 5e-2), "value": (1.5e-1, 5e-2),
             "logits": (1e-1, 2e-2), "hf": (1e-1, 2e-2)},
    "int4": {"stat": "elemwise", "": (1e-3, 1e-2)},
    "int4-int8": {"stat": "mean", "": (1e-1, 0.0), "logits": (5e-1, 0.0), "query": (1e-2, 0.0),
                  "score": (1e-2, 0.0)},
}
REFERENCE = "kvtrt-torch"
FAILURES_SHOWN = 20
HF = "hf-transformers"


@dataclass
class OutputCheck:
    """One output of one case against one reference."""

    case: str
    graph: str
    output: str
    reference: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    mean_abs: float = 0.0
    stat: str = "elemwise"


@dataclass
class LintResult:
    graph: str
    passed: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class ValidationReport:
    """Everything `validate` found; `passed` is the verdict."""

    directory: str
    kind: str
    lint: list[LintResult]
    checks: list[OutputCheck]
    files: dict[str, str]

    @property
    def passed(self) -> bool:
        return all(l.passed for l in self.lint) and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]

    def table(self, every_output: bool = False) -> str:
        """Rows per (case, reference, output kind) with the worst output of the kind named, or one row
        per output with `every_output`; failing outputs are listed by name below the table."""
        def error(c: OutputCheck) -> float:  # what the tolerance is checked against
            return {"mean": c.mean_abs, "block bound": c.max_rel * c.atol}.get(c.stat, c.max_abs)

        rows = []
        if every_output:
            for c in self.checks:
                rows.append((c.case, c.reference, c.output, c.max_abs, c.mean_abs, c.max_rel, c.atol, c.rtol,
                             c.stat, c.passed))
        else:
            groups: dict[tuple, list[OutputCheck]] = OrderedDict()
            for c in self.checks:
                kind = "weight" if c.graph == "weights" else c.output.split(".")[0]
                groups.setdefault((c.case, c.reference, kind), []).append(c)
            for (case, ref, kind), checks in groups.items():
                worst = max(checks, key=lambda c: error(c) / max(c.atol, 1e-30))
                label = kind if len(checks) == 1 else f"{kind}.* ({len(checks)}, worst {worst.output})"
                rows.append((case, ref, label, max(c.max_abs for c in checks), max(c.mean_abs for c in checks),
                             max(c.max_rel for c in checks), worst.atol, worst.rtol, worst.stat,
                             all(c.passed for c in checks)))
        header = ("case", "reference", "output", "max abs", "mean abs", "max rel", "atol", "rtol", "check", "result")
        body = [(a, b, c, f"{d:.3g}", f"{e:.3g}", f"{f:.3g}", f"{g:g}", f"{h:g}", i, "pass" if j else "FAIL")
                for a, b, c, d, e, f, g, h, i, j in rows]
        widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for lint in self.lint:
            state = "skipped (" + lint.skipped + ")" if lint.skipped else ("pass" if lint.passed else "FAIL")
            lines.append(f"lint {lint.graph}: {state}" + "".join(f"\n  error: {e}" for e in lint.errors)
                         + (f" ({len(lint.warnings)} warnings)" if lint.warnings else ""))
        shown = self.failures if every_output else self.failures[:FAILURES_SHOWN]
        for c in shown:
            what = {"mean": f"mean abs {c.mean_abs:.3g} > atol {c.atol:g}",
                    "block bound": f"max abs {c.max_abs:.3g}, {c.max_rel:.3g} x its block's rounding bound"}.get(
                c.stat, f"max abs {c.max_abs:.3g} > atol {c.atol:g} and rel > rtol {c.rtol:g}")
            lines.append(f"FAILED: {c.graph} output '{c.output}' in case '{c.case}' vs {c.reference}: {what}")
        if len(shown) < len(self.failures):
            names = sorted({c.output for c in self.failures}, key=lambda n: (n.split(".")[0], len(n), n))
            lines.append(f"... {len(self.failures) - len(shown)} more failures (--all-outputs or --json for all); "
                         f"failing outputs: {', '.join(names)}")
        lines.append("validation " + ("PASSED" if self.passed else "FAILED") + f" ({self.kind} tolerances, "
                     f"{len(self.checks)} output comparisons)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"directory": self.directory, "kind": self.kind, "passed": self.passed,
                "lint": [asdict(l) for l in self.lint], "checks": [asdict(c) for c in self.checks],
                "failures": [f"{c.graph}:{c.case}:{c.output}:{c.reference}" for c in self.failures],
                "files": self.files}


@dataclass
class Case:
    name: str
    graph: str  # a GraphVariant of the export
    inputs: "OrderedDict[str, np.ndarray]"
    reference: "OrderedDict[str, np.ndarray]"
    hf_logits: np.ndarray | None = None


# -- reference -------------------------------------------------------------------------------------
def load_reference(manifest: Manifest, reference_model=None):
    """The fp32 HF model the export came from: `reference_model` (a model or (model, tokenizer)),
    or loaded from `manifest.source`; refused when its family differs from the export's."""
    if reference_model is None:
        if manifest.source in ("", "in-memory model"):
            raise ValueError("this export was made from an in-memory model, so validate cannot reload it: pass "
                             "the Hugging Face model as validate(directory, reference_model=model)")
        from ..models.loading import load_hf

        reference_model, _ = load_hf(manifest.source)
    if isinstance(reference_model, tuple):
        reference_model = reference_model[0]
    if getattr(reference_model.config, "model_type", None) != manifest.model_type:
        raise ValueError(f"the reference model is a {reference_model.config.model_type!r}, the export a "
                         f"{manifest.model_type!r}: pass the model the export was made from")
    quantized = getattr(reference_model, "is_quantized", False)
    if next(reference_model.parameters()).dtype != torch.float32 and not quantized:
        reference_model = reference_model.float()  # the reference runs in fp32 whatever the export's dtype
    return reference_model.eval()


def _modules(hf_model, manifest: Manifest, directory: Path, weight_checks: list | None = None):
    from ..models import get_adapter

    adapter = get_adapter(manifest.model_type)
    attention = manifest.export_options.get("attention", "ops")
    modules = {GraphVariant(v): adapter.build(hf_model, manifest.max_positions, torch.float32, v, attention=attention,
                                              score_heads=manifest.score_heads)
               for v in manifest.variant_graphs}
    if manifest.quantize != "none":
        from .quantize import dequantized_weights

        options = manifest.export_options.get("quantize") or {}
        for variant, module in modules.items():
            dequantized = dequantized_weights(directory, variant)
            if weight_checks is not None and variant == next(iter(modules)):
                weight_checks += check_quantized_weights(module, dequantized, options.get("scheme", "offset"),
                                                         options.get("block_size", 32), options.get("symmetric"))
            for name, weight in dequantized.items():
                param = getattr(module, name, None)
                if param is None or tuple(param.shape) != weight.shape:
                    raise ValueError(f"quantized weight {name} {weight.shape} does not match the reference model")
                param.data = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    return modules


def check_quantized_weights(module, dequantized: dict[str, np.ndarray], scheme: str, block: int,
                            symmetric: bool | None) -> list[OutputCheck]:
    """Quantized exports only: every dequantized weight must lie within its block's rounding bound of
    the reference model's float weight - half a step (max-min)/15 for the `offset` scheme, one step
    for onnxruntime's `rtn` (zero-point rounding and clipping add up to half a step more). The graph
    comparison cannot see corrupted int4 weights (its reference is dequantized from the same file);
    this can. Reported as case "int4 weights": max abs = largest |w_int4 - w_float|, max rel = largest
    error / bound (must be <= 1)."""
    checks = []
    for name, quantized in dequantized.items():
        reference = getattr(module, name).detach().float().numpy()
        blocks_q = quantized if name == "embed_weight" else quantized.T  # [rows, K]
        blocks_f = reference if name == "embed_weight" else reference.T
        rows, K = blocks_f.shape
        kb = K // block
        if kb * block != K:
            continue
        q, f = blocks_q.reshape(rows, kb, block), blocks_f.reshape(rows, kb, block)
        low, high = f.min(-1, keepdims=True), f.max(-1, keepdims=True)
        if scheme == "rtn":
            step = (np.abs(f).max(-1, keepdims=True) / 8 if symmetric else
                    (np.maximum(high, 0) - np.minimum(low, 0)) / 15)
        else:
            step = (high - low) / 15 / 2  # round to nearest: half a step
        err = np.abs(q - f)
        bound = step * 1.001 + 2e-3 * np.abs(f) + 1e-6  # slack: float rounding, fp16 scales and exports
        ratio = float((err / bound).max())
        checks.append(OutputCheck("int4 weights", "weights", name, "hf-float", float(err.max()), ratio,
                                  float(bound.max()), 1.0, ratio <= 1.0, float(err.mean()), "block bound"))
    return checks


def build_cases(hf_model, manifest: Manifest, directory: Path, batch: int = 2, first: int = 12, second: int = 7,
                seed: int = 0, weight_checks: list | None = None) -> list[Case]:
    """The four validation cases (see the module docstring), with reference outputs; for a quantized
    export, `weight_checks` (a list) receives `check_quantized_weights`' results."""
    modules = _modules(hf_model, manifest, directory, weight_checks)
    L = manifest.n_layers
    np_dtype = np.float16 if manifest.kv_dtype == "fp16" else np.float32
    gen = torch.Generator().manual_seed(seed)
    vocab = min(manifest.vocab_size, hf_model.config.vocab_size)
    ids1 = torch.randint(0, vocab, (batch, first), generator=gen)
    ids2 = torch.randint(0, vocab, (batch, second), generator=gen)
    ids3 = torch.randint(0, vocab, (batch, 1), generator=gen)
    empty = [torch.zeros(batch, manifest.n_kv_heads, 0, manifest.head_dim) for _ in range(2 * L)]

    def run(variant, ids, start, mask, past, write_slot=None):
        pos = torch.arange(start, start + ids.shape[1]).repeat(batch, 1)
        extra = {}
        if variant.is_prefill:  # the score window's rows, as the runtime asks on a last chunk
            extra["score_queries"] = torch.arange(max(0, ids.shape[1] - manifest.score_window), ids.shape[1])
        if write_slot is not None:  # prefill_shared: one slot for the chunk; decode_shared: one per row
            extra["write_slot"] = torch.tensor(write_slot) if variant.is_prefill else torch.full((batch,), write_slot)
        with torch.no_grad():
            out = modules[variant](ids, pos, mask, *extra.values(), *past)
        inputs = OrderedDict(input_ids=ids.numpy(), position_ids=pos.numpy(), past_mask=mask.numpy())
        inputs.update((name, tensor.numpy()) for name, tensor in extra.items())
        for name, tensor in zip(past_names(L), past):
            inputs[name] = tensor.numpy().astype(np_dtype)
        names = output_names(L, variant)
        return inputs, OrderedDict((n, t.float().numpy()) for n, t in zip(names, out)), out

    def kv(out):
        return list(out[1:1 + 2 * L])

    def hf_logits(ids):
        if manifest.quantize != "none":
            return None
        with torch.no_grad():
            return hf_model(ids).logits[:, -1:].float().numpy()

    cases = []
    mask0 = torch.ones(batch, 0, dtype=torch.long)
    prefill, prefill_shared = GraphVariant.PREFILL, GraphVariant.PREFILL_SHARED
    decode, decode_shared = GraphVariant.DECODE, GraphVariant.DECODE_SHARED
    inp, ref, out1 = run(prefill, ids1, 0, mask0, empty)
    cases.append(Case("prefill P=0", prefill, inp, ref, hf_logits(ids1)))
    past1 = [t.to(torch.float16).float() if np_dtype == np.float16 else t for t in kv(out1)]
    inp, ref, out2 = run(prefill, ids2, first, torch.ones(batch, first, dtype=torch.long), past1)
    cases.append(Case(f"prefill P={first}", prefill, inp, ref, hf_logits(torch.cat([ids1, ids2], 1))))
    past2 = [torch.cat([a, b.to(torch.float16).float() if np_dtype == np.float16 else b], 2)
             for a, b in zip(past1, kv(out2))]
    P = first + second
    if prefill_shared in modules:  # the same two chunks written in place into buffers they fill
        buffers = [torch.zeros_like(t) for t in past1]
        inp, ref, _ = run(prefill_shared, ids1, 0, torch.ones(batch, first, dtype=torch.long), buffers, 0)
        cases.append(Case("prefill_shared P=0", prefill_shared, inp, ref, hf_logits(ids1)))
        buffers = [torch.cat([t, torch.zeros_like(t[:, :, :second])], 2) for t in past1]
        inp, ref, _ = run(prefill_shared, ids2, first, torch.ones(batch, P, dtype=torch.long), buffers, first)
        cases.append(Case(f"prefill_shared P={first}", prefill_shared, inp, ref,
                          hf_logits(torch.cat([ids1, ids2], 1))))
    inp, ref, _ = run(decode, ids3, P, torch.ones(batch, P, dtype=torch.long), past2)
    cases.append(Case(f"decode P={P}", decode, inp, ref, hf_logits(torch.cat([ids1, ids2, ids3], 1))))
    mask = torch.ones(batch, P, dtype=torch.long)
    mask[0, 2:5] = 0  # evicted slots in the middle
    mask[-1, :3] = 0  # and at the start of the other sequence
    inp, ref, _ = run(decode, ids3, P, mask, past2)
    cases.append(Case(f"decode P={P} masked", decode, inp, ref, None))
    if decode_shared in modules:  # the buffer has one free slot, the one the step writes
        buffers = [torch.cat([t, torch.zeros_like(t[:, :, :1])], 2) for t in past2]
        live = torch.ones(batch, 1, dtype=torch.long)
        inp, ref, _ = run(decode_shared, ids3, P, torch.ones(batch, P + 1, dtype=torch.long), buffers, P)
        cases.append(Case(f"decode_shared P={P}", decode_shared, inp, ref,
                          hf_logits(torch.cat([ids1, ids2, ids3], 1))))
        inp, ref, _ = run(decode_shared, ids3, P, torch.cat([mask, live], 1), buffers, P)
        cases.append(Case(f"decode_shared P={P} masked", decode_shared, inp, ref, None))
    return cases


# -- polygraphy ------------------------------------------------------------------------------------
def _tolerances(kind: str, reference: str, names: list[str]) -> tuple[dict, dict]:
    table = TOLERANCES[kind]
    atol, rtol = {}, {}
    for name in names:
        key = "hf" if reference == HF and "hf" in table else name.split(".")[0]
        a, r = table.get(key, table[""])
        atol[name], rtol[name] = a, r
    return atol, rtol


def _exact(name, index, iter_result):  # polygraphy's default also matches by substring and index
    return [name] if name in iter_result else None


def save_cases(cases: list[Case], out_dir: Path) -> dict[str, str]:
    """Polygraphy files per graph: <graph>_inputs.json (--load-inputs), <graph>_golden.json
    (--load-outputs, RunResults of the PyTorch reference and, where given, HF logits)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        for graph in dict.fromkeys(c.graph for c in cases):
            mine = [c for c in cases if c.graph == graph]
            save_json([c.inputs for c in mine], str(out_dir / f"{graph}_inputs.json"))
            golden = RunResults()
            golden.append((REFERENCE, [IterationResult(c.reference, runner_name=REFERENCE) for c in mine]))
            golden.save(str(out_dir / f"{graph}_golden.json"))
            files[f"{graph}_inputs"] = str(out_dir / f"{graph}_inputs.json")
            files[f"{graph}_golden"] = str(out_dir / f"{graph}_golden.json")
    return files


def compare(directory: Path, manifest: Manifest, cases: list[Case], kind: str,
            providers: list[str] | None = None) -> list[OutputCheck]:
    """Run ONNX Runtime through Polygraphy and compare it with the references (Polygraphy's
    `Comparator.compare_accuracy` + `CompareFunc.simple`, elementwise)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    try:  # polygraphy >= 0.53 (CompareFunc.simple is its deprecated alias)
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # older polygraphy
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple
    names = list(dict.fromkeys(n for graph in manifest.variant_graphs for n in output_names(manifest.n_layers, graph)))
    checks = []
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        for graph in dict.fromkeys(c.graph for c in cases):
            mine = [c for c in cases if c.graph == graph]
            runner = OnnxrtRunner(SessionFromOnnx(str(directory / manifest.graphs[graph]),
                                                  providers=providers or ["cpu"]), name=f"onnxrt-{graph}")
            ran = Comparator.run([runner], data_loader=[c.inputs for c in mine])
            ort_iters = ran[runner.name]
            for case, ort in zip(mine, ort_iters):
                for ref_name, outputs in ((REFERENCE, case.reference), (HF, None if case.hf_logits is None else
                                                                         {"logits": case.hf_logits})):
                    if outputs is None:
                        continue
                    atol, rtol = _tolerances(kind, ref_name, names)
                    run = RunResults()
                    run.append((runner.name, [ort]))
                    run.append((ref_name, [IterationResult(OrderedDict(outputs), runner_name=ref_name)]))
                    stat = TOLERANCES[kind]["stat"]
                    func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=stat, find_output_func=_exact)
                    accuracy = Comparator.compare_accuracy(run, compare_func=func)
                    results = accuracy[0][(runner.name, ref_name)][0]
                    for output, result in results.items():
                        if isinstance(result, bool):  # shape mismatch: polygraphy gives a bare False
                            checks.append(OutputCheck(case.name, graph, output, ref_name, float("inf"),
                                                      float("inf"), atol[output], rtol[output], bool(result),
                                                      float("inf"), stat))
                            continue
                        checks.append(OutputCheck(case.name, graph, output, ref_name, result.max_absdiff,
                                                  result.max_reldiff, atol[output], rtol[output], bool(result),
                                                  result.mean_absdiff, stat))
    return checks


def lint(directory: Path, manifest: Manifest, files: dict[str, str], timeout: float = 900) -> list[LintResult]:
    """`polygraphy check lint` on every graph, fed the validation inputs, in a subprocess."""
    results = []
    code = "import sys; from polygraphy.tools._main import main; sys.exit(main())"
    for graph, filename in manifest.variant_graphs.items():
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "lint.json"
            cmd = [sys.executable, "-c", code, "check", "lint", str(directory / filename), "-q", "-o", str(report)]
            if f"{graph}_inputs" in files:
                cmd += ["--load-inputs", files[f"{graph}_inputs"]]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if not report.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                if "onnx_graphsurgeon" in (proc.stderr + proc.stdout):
                    results.append(LintResult(graph, True, skipped="polygraphy lint needs onnx-graphsurgeon: "
                                                                   "pip install onnx-graphsurgeon"))
                else:
                    results.append(LintResult(graph, False,
                                              errors=[f"polygraphy check lint failed: {' | '.join(tail)}"]))
                continue
            data = json.loads(report.read_text())
        errors, warnings = [], []
        for entry in data.get("lint_entries", []):
            text = f"[{entry.get('source', '?')}] {entry.get('message', '').strip()}"
            if entry.get("nodes"):
                text += f" (nodes: {', '.join(entry['nodes'][:5])})"
            (errors if entry.get("level") == "error" else warnings).append(text)
        failing = data.get("summary", {}).get("failing", [])
        if failing and not errors:
            errors.append(f"failing nodes: {', '.join(failing[:10])}")
        results.append(LintResult(graph, not errors, errors, warnings))
    return results


def write_polygraphy_script(out_dir: Path, directory: Path, manifest: Manifest, kind: str) -> Path:
    """`polygraphy_run.sh`: the same comparison from the command line (ONNX Runtime vs the goldens)."""
    names = list(dict.fromkeys(n for graph in manifest.variant_graphs for n in output_names(manifest.n_layers, graph)))
    atol, rtol = _tolerances(kind, REFERENCE, names)
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault((atol[n], rtol[n]), []).append(n)
    default = max(groups, key=lambda k: len(groups[k]))
    a_args = [f"{default[0]:g}"] + [f"{n}:{k[0]:g}" for k, ns in groups.items() if k != default for n in ns]
    r_args = [f"{default[1]:g}"] + [f"{n}:{k[1]:g}" for k, ns in groups.items() if k != default for n in ns]
    lines = ["#!/usr/bin/env bash", "# Replays `kvtrt validate`'s comparison with the Polygraphy CLI: ONNX Runtime",
             "# against the PyTorch reference outputs saved beside this script.", "set -euo pipefail",
             'HERE="$(cd "$(dirname "$0")" && pwd)"', f'EXPORT="${{EXPORT:-{directory.resolve()}}}"']
    for graph, filename in manifest.variant_graphs.items():
        lines.append(f'polygraphy run "$EXPORT/{filename}" --onnxrt --load-inputs "$HERE/{graph}_inputs.json" '
                     f'--load-outputs "$HERE/{graph}_golden.json" --check-error-stat {TOLERANCES[kind]["stat"]} '
                     f'--atol {" ".join(a_args)} --rtol {" ".join(r_args)}')
    path = out_dir / "polygraphy_run.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


# -- entry point -----------------------------------------------------------------------------------
def export_kind(manifest: Manifest) -> str:
    """The TOLERANCES row of an export: fp32, fp16 (fp16 weights or KV), int4 (fp32 compute) or int4-int8."""
    if manifest.quantize == "none":
        return "fp16" if manifest.kv_dtype == "fp16" else manifest.dtype
    level = (manifest.export_options.get("quantize") or {}).get("accuracy_level", 4)
    return "int4" if manifest.kv_dtype == "fp32" and level in (0, 1) else "int4-int8"


def validate(directory: str | os.PathLike, reference_model=None, *, json_out: str | os.PathLike | None = None,
             save_dir: str | os.PathLike | None = None, run_lint: bool = True, batch: int = 2,
             seed: int = 0, providers: list[str] | None = None) -> ValidationReport:
    """Validate the export in `directory` (see the module docstring) and return the report.

    `reference_model`: the HF model (or `(model, tokenizer)`) the export came from; by default it is
    loaded from `manifest.source`. `save_dir`: where the Polygraphy inputs/goldens/scripts go
    (default `DIR/validation`, or a temporary folder when DIR is not writable).
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    kind = export_kind(manifest)
    hf_model = load_reference(manifest, reference_model)
    weight_checks: list[OutputCheck] = []
    cases = build_cases(hf_model, manifest, directory, batch=batch, seed=seed, weight_checks=weight_checks)
    tmp = None
    if save_dir is None:
        save_dir = directory / "validation"
        if not os.access(directory, os.W_OK):
            tmp = tempfile.mkdtemp(prefix="kvtrt-validate-")
            save_dir = Path(tmp)
    save_dir = Path(save_dir)
    files = save_cases(cases, save_dir)
    files["polygraphy_run"] = str(write_polygraphy_script(save_dir, directory, manifest, kind))
    checks = weight_checks + compare(directory, manifest, cases, kind, providers)
    lints = lint(directory, manifest, files) if run_lint else \
        [LintResult(g, True, skipped="--no-lint") for g in manifest.variant_graphs]
    report = ValidationReport(str(directory), kind, lints, checks, files)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if tmp is not None:
        report.files = {k: v + " (temporary, removed)" for k, v in files.items()}
        shutil.rmtree(tmp, ignore_errors=True)
    return report


__all__ = ["validate", "ValidationReport", "OutputCheck", "LintResult", "TOLERANCES", "build_cases", "compare",
           "lint", "load_reference", "save_cases"]
