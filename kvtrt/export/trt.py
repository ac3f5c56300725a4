"""TensorRT: optimization profiles, ready-to-run trtexec/Polygraphy commands, and engine builds.

**How profiles map to the two graphs.** The export has two graphs (prefill: S new tokens,
grouped attention; decode: S fixed to 1, GEMV attention), so TensorRT gets **one engine per
graph, each with one optimization profile**:

| engine | batch B | new tokens S | past slots P |
|---|---|---|---|
| `prefill.engine` | 1..max_batch | 1..prefill_chunk (opt = chunk) | 0..capacity (opt = capacity/2) |
| `decode.engine` | 1..max_batch | 1 | 1..decode_view (opt = view/2) |

Related dimensions agree in every profile (min, opt and max alike): one batch for all inputs,
`input_ids` and `position_ids` share [B,S], and `past_mask` [B,P] has exactly as many slots as
every `past_key.{l}`/`past_value.{l}` [B,Hkv,P,D]; Hkv and D are the export's.
`check_profiles` enforces this and the tests parse the written commands back to check it.
Two engines instead of one engine with two profiles: the graphs differ (decode has static S=1
reshapes and another attention order), and a profile per engine keeps `trtexec` to a single
`--minShapes/--optShapes/--maxShapes` group (its `--profile=N` only selects which profile an
inference run uses).

**Precision.** TensorRT 11 builds strongly typed networks only (the `STRONGLY_TYPED` flag and
`trtexec --stronglyTyped` are accepted and ignored there; TensorRT 10 needs them to opt in): the
ONNX graph's dtypes are the engine's. The commands therefore target an `--dtype fp16` export; an
fp32 export builds an fp32 engine (allowed, with a note). The graphs use standard ONNX ops only
(`check_trt_graph` verifies no `com.microsoft` op is present); an int4 export (MatMulNBits,
GatherBlockQuantized) cannot be parsed by TensorRT and is refused.

GPU-only parts (`build_engines`, and `kvtrt.runtime.trt_engine.TrtEngine`) import `tensorrt`
lazily (`pip install 'kvtrt[trt]'`) and follow the documented TensorRT 10/11 Python API
(Builder, OnnxParser.parse_from_file, IOptimizationProfile.set_shape, build_serialized_network).
They are UNVERIFIED here: this machine has no GPU.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract import DEFAULT_PREFILL_CHUNK, ENGINE_DIR, ENGINE_INDEX, GraphVariant, input_names
from ..manifest import Manifest
from ..runtime.trt_engine import import_tensorrt

Shape = tuple[int, ...]


@dataclass
class Profile:
    """min/opt/max shapes of every input of one graph (one TensorRT optimization profile)."""

    graph: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def select(self, which: int) -> dict[str, Shape]:
        """0 = min, 1 = opt, 2 = max."""
        return {name: s[which] for name, s in self.shapes.items()}


def trt_profiles(manifest: Manifest, *, max_batch: int = 1, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 capacity: int | None = None,
                 decode_view: int | None = None, opt_batch: int = 1) -> dict[str, Profile]:
    """The prefill and decode profiles (see the module docstring)."""
    capacity = manifest.max_positions if capacity is None else capacity
    decode_view = manifest.max_positions if decode_view is None else decode_view
    for label, value, low in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                              ("capacity", capacity, 0), ("decode_view", decode_view, 1), ("opt_batch", opt_batch, 1)):
        if value < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    if opt_batch > max_batch:
        raise ValueError(f"opt_batch {opt_batch} exceeds max_batch {max_batch}")
    for label, value in (("capacity", capacity), ("decode_view", decode_view)):
        if value > manifest.max_positions:
            raise ValueError(f"{label} {value} is more past slots than the export's {manifest.max_positions} positions "
                             f"allow; use at most {manifest.max_positions}")
    batch = (1, opt_batch, max_batch)
    prefill = _profile(manifest, GraphVariant.PREFILL, batch, (1, prefill_chunk, prefill_chunk),
                       (0, capacity // 2, capacity))
    decode = _profile(manifest, GraphVariant.DECODE, batch, (1, 1, 1), (1, max(1, decode_view // 2), decode_view))
    profiles = {str(GraphVariant.PREFILL): prefill, str(GraphVariant.DECODE): decode}
    problems = check_profiles(profiles, manifest)
    if problems:  # a bug here, not a user error
        raise AssertionError("inconsistent TensorRT profiles: " + "; ".join(problems))
    return {k: v for k, v in profiles.items() if k in manifest.variant_graphs}


def _profile(manifest: Manifest, graph: GraphVariant, b: tuple, s: tuple, p: tuple) -> Profile:
    Hkv, D = manifest.n_kv_heads, manifest.head_dim
    shapes = {}
    for name in input_names(manifest.n_layers, graph):
        if name in ("input_ids", "position_ids"):
            shapes[name] = tuple((b[i], s[i]) for i in range(3))
        elif name == "score_queries":  # 1 row, the score window, at most every row of a chunk
            shapes[name] = ((1,), (min(manifest.score_window, s[1]),), (s[2],))
        elif name == "past_mask":
            shapes[name] = tuple((b[i], p[i]) for i in range(3))
        else:
            shapes[name] = tuple((b[i], Hkv, p[i], D) for i in range(3))
    return Profile(str(graph), shapes)


def check_profiles(profiles: dict[str, Profile], manifest: Manifest) -> list[str]:
    """Every way the profiles could disagree with each other or with the graph contract."""
    problems = []
    for graph, profile in profiles.items():
        want = input_names(manifest.n_layers, graph)
        if sorted(profile.shapes) != sorted(want):
            problems.append(f"{graph}: inputs {sorted(set(want) ^ set(profile.shapes))} missing or extra")
            continue
        for name, (lo, opt, hi) in profile.shapes.items():
            if not len(lo) == len(opt) == len(hi):
                problems.append(f"{graph}/{name}: min/opt/max ranks differ")
            elif any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
                problems.append(f"{graph}/{name}: not min <= opt <= max ({lo}, {opt}, {hi})")
        for which, label in enumerate(("min", "opt", "max")):
            shapes = profile.select(which)
            batches = {name: s[0] for name, s in shapes.items() if name != "score_queries"}
            if len(set(batches.values())) != 1:
                problems.append(f"{graph} {label}: batch differs across inputs {sorted(set(batches.values()))}")
            if shapes["input_ids"] != shapes["position_ids"] or len(shapes["input_ids"]) != 2:
                problems.append(f"{graph} {label}: input_ids {shapes['input_ids']} != position_ids "
                                f"{shapes['position_ids']}")
            if GraphVariant(graph).is_decode and shapes["input_ids"][1] != 1:
                problems.append(f"decode {label}: S must be 1, got {shapes['input_ids'][1]}")
            if "score_queries" in shapes and shapes["score_queries"][0] > shapes["input_ids"][1]:
                problems.append(f"{graph} {label}: {shapes['score_queries'][0]} score rows but S = "
                                f"{shapes['input_ids'][1]}")
            slots = shapes["past_mask"][1]
            for name, shape in shapes.items():
                if name.startswith("past_") and name != "past_mask":
                    if len(shape) != 4 or shape[1] != manifest.n_kv_heads or shape[3] != manifest.head_dim:
                        problems.append(f"{graph} {label}: {name} {shape} is not [B,{manifest.n_kv_heads},P,"
                                        f"{manifest.head_dim}]")
                    elif shape[2] != slots:
                        problems.append(f"{graph} {label}: {name} has P={shape[2]} but past_mask has {slots}")
    return problems


# -- graph check -----------------------------------------------------------------------------------
@dataclass
class GraphCheck:
    graph: str
    domains: dict[str, int]
    op_types: dict[str, int]
    input_types: dict[str, str]

    @property
    def standard_only(self) -> bool:
        return set(self.domains) <= {"", "ai.onnx"}


def check_trt_graph(directory: str | os.PathLike) -> dict[str, GraphCheck]:
    """Op domains, op types and input dtypes of every graph (no weights loaded)."""
    import onnx

    directory = Path(directory)
    manifest = Manifest.load(directory)
    out = {}
    for graph, filename in manifest.variant_graphs.items():
        model = onnx.load(str(directory / filename), load_external_data=False)
        domains: dict[str, int] = {}
        ops: dict[str, int] = {}
        for node in model.graph.node:
            domains[node.domain] = domains.get(node.domain, 0) + 1
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        types = {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in model.graph.input}
        out[graph] = GraphCheck(graph, domains, dict(sorted(ops.items())), types)
    return out


def _require_trt_graph(directory: Path, manifest: Manifest) -> list[str]:
    notes = []
    checks = check_trt_graph(directory)
    for graph, check in checks.items():
        if not check.standard_only:
            custom = sorted(d for d in check.domains if d not in ("", "ai.onnx"))
            contrib = sorted(op for op in ("GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized")
                             if op in check.op_types)
            raise ValueError(f"{graph} graph uses ops of domain(s) {custom} ({', '.join(contrib) or 'contrib ops'}), "
                             f"which TensorRT's ONNX parser cannot read; build engines from a float export with "
                             f"standard-op attention (`kvtrt export MODEL --dtype fp16 -o DIR`, or "
                             f"`--attention ops` for fp32), not a quantized one")
    notes.append("graphs use standard ONNX ops only (domain ai.onnx, no com.microsoft): "
                 + ", ".join(f"{op}" for op in checks[next(iter(checks))].op_types))
    if manifest.dtype != "fp16":
        notes.append(f"this export's dtype is {manifest.dtype}: TensorRT 11 is strongly typed, so it builds an "
                     f"{manifest.dtype} engine; export with `--dtype fp16` for fp16 engines")
    return notes


# -- commands --------------------------------------------------------------------------------------
@dataclass
class TrtCommands:
    script: Path
    profiles_json: Path
    notes: list[str] = field(default_factory=list)


def _dims(shape: Shape, sep: str = "x") -> str:
    return sep.join(str(d) for d in shape)


def _trtexec_spec(shapes: dict[str, Shape]) -> str:
    return ",".join(f"{name}:{_dims(shape)}" for name, shape in shapes.items())


def _polygraphy_spec(shapes: dict[str, Shape]) -> str:
    return " ".join(f"'{name}:[{_dims(shape, ',')}]'" for name, shape in shapes.items())  # quoted: [] globs


def sample_inputs(manifest: Manifest, graph: str, batch: int = 1, new: int = 8, past: int = 16,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Small valid inputs for one graph call (random tokens, random past K/V, all slots live)."""
    rng = np.random.default_rng(seed)
    variant = GraphVariant(graph)
    new = 1 if variant.is_decode else new
    dtype = np.float16 if manifest.kv_dtype == "fp16" else np.float32
    out = {"input_ids": rng.integers(0, manifest.vocab_size, (batch, new), dtype=np.int64),
           "position_ids": np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1)),
           "past_mask": np.ones((batch, past), dtype=np.int64)}
    if variant.is_prefill:
        out["score_queries"] = np.arange(max(0, new - manifest.score_window), new, dtype=np.int64)
    for name in input_names(manifest.n_layers, graph)[len(out):]:
        out[name] = (rng.standard_normal((batch, manifest.n_kv_heads, past, manifest.head_dim)) * 0.5).astype(dtype)
    return out


def write_trt_commands(directory: str | os.PathLike, out_dir: str | os.PathLike, *, max_batch: int = 1,
                       prefill_chunk: int = DEFAULT_PREFILL_CHUNK, capacity: int | None = None,
                       decode_view: int | None = None, opt_batch: int = 1) -> TrtCommands:
    """Write `build.sh` (trtexec builds and runs, `polygraphy run --trt --onnxrt` comparisons),
    `profiles.json` and the input files they read into `out_dir`."""
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    directory, out_dir = Path(directory).resolve(), Path(out_dir)
    manifest = Manifest.load(directory)
    notes = _require_trt_graph(directory, manifest)
    profiles = trt_profiles(manifest, max_batch=max_batch, prefill_chunk=prefill_chunk, capacity=capacity,
                            decode_view=decode_view, opt_batch=opt_batch)
    out_dir.mkdir(parents=True, exist_ok=True)
    tol = "--atol 1e-1 --rtol 2e-2" if manifest.dtype == "fp16" else "--atol 1e-3 --rtol 1e-3"
    lines = [
        "#!/usr/bin/env bash",
        f"# TensorRT engines for the kvtrt export {directory} ({manifest.source}, {manifest.dtype}).",
        "# Generated by `kvtrt validate --trt-commands`; needs trtexec and polygraphy on a machine with an NVIDIA GPU.",
        "# One engine per graph, one optimization profile each:",
    ]
    for graph, profile in profiles.items():
        lo, opt, hi = (profile.select(i) for i in range(3))
        lines.append(f"#   {graph}: batch {lo['input_ids'][0]}..{hi['input_ids'][0]}, new tokens "
                     f"{lo['input_ids'][1]}..{hi['input_ids'][1]}, "
                     f"past slots {lo['past_mask'][1]}..{hi['past_mask'][1]}"
                     f" (opt {opt['input_ids'][0]}x{opt['input_ids'][1]}, P={opt['past_mask'][1]})")
    lines += [
        "# TensorRT 11 is strongly typed (the graph's dtypes are the engine's; --stronglyTyped is a no-op there and",
        "# opts in on TensorRT 10). Set TRT_TYPING= to drop the flag.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "$0")" && pwd)"',
        f'EXPORT="${{EXPORT:-{directory}}}"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        'TRT_TYPING="${TRT_TYPING---stronglyTyped}"',
        "",
    ]
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        for graph, profile in profiles.items():
            filename = manifest.graphs[graph]
            lo, opt, hi = (profile.select(i) for i in range(3))
            sample = sample_inputs(manifest, graph, batch=1, new=min(8, prefill_chunk),
                                   past=min(16, hi["past_mask"][1]))
            bins = out_dir / "inputs" / graph
            bins.mkdir(parents=True, exist_ok=True)
            for name, array in sample.items():
                array.tofile(bins / f"{name}.bin")
            save_json([sample], str(out_dir / f"{graph}_inputs.json"))
            shapes = {name: tuple(a.shape) for name, a in sample.items()}
            load = ",".join(f"{name}:$HERE/inputs/{graph}/{name}.bin" for name in sample)
            lines += [
                f"# --- {graph}: build {graph}.engine",
                f'"$TRTEXEC" --onnx="$EXPORT/{filename}" $TRT_TYPING --skipInference \\',
                f"  --minShapes={_trtexec_spec(lo)} \\",
                f"  --optShapes={_trtexec_spec(opt)} \\",
                f"  --maxShapes={_trtexec_spec(hi)} \\",
                f'  --saveEngine="$HERE/{graph}.engine"',
                f"# --- {graph}: run the engine on the saved inputs",
                f'"$TRTEXEC" --loadEngine="$HERE/{graph}.engine" \\',
                f"  --shapes={_trtexec_spec(shapes)} \\",
                f'  --loadInputs="{load}"',
                f"# --- {graph}: TensorRT vs ONNX Runtime on the same inputs (Polygraphy)",
                f'polygraphy run "$EXPORT/{filename}" --trt --onnxrt --strongly-typed \\',
                f"  --trt-min-shapes {_polygraphy_spec(lo)} \\",
                f"  --trt-opt-shapes {_polygraphy_spec(opt)} \\",
                f"  --trt-max-shapes {_polygraphy_spec(hi)} \\",
                f'  --load-inputs "$HERE/{graph}_inputs.json" {tol}',
                "",
            ]
    script = out_dir / "build.sh"
    script.write_text("\n".join(lines))
    script.chmod(0o755)
    profiles_json = out_dir / "profiles.json"
    profiles_json.write_text(json.dumps(
        {graph: {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in p.shapes.items()}
         for graph, p in profiles.items()}, indent=1) + "\n")
    return TrtCommands(script, profiles_json, notes)


def parse_trtexec_profiles(script: str) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Read the build commands of a `build.sh` back: {onnx file stem: {input: (min, opt, max)}}."""
    out = {}
    commands = script.replace("\\\n", " ").splitlines()
    for command in commands:
        words = shlex.split(command, comments=True, posix=True) if command.strip() else []
        specs = {w.split("=", 1)[0]: w.split("=", 1)[1] for w in words if w.startswith("--") and "=" in w}
        if "--onnx" not in specs or "--minShapes" not in specs:
            continue
        parsed = [_parse_spec(specs[k]) for k in ("--minShapes", "--optShapes", "--maxShapes")]
        stem = Path(specs["--onnx"]).stem
        out[stem] = {name: (parsed[0][name], parsed[1][name], parsed[2][name]) for name in parsed[0]}
    return out


def _parse_spec(spec: str) -> dict[str, Shape]:
    out = {}
    for item in spec.split(","):
        name, dims = item.rsplit(":", 1)
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


# -- engine build (GPU) ----------------------------------------------------------------------------
def build_engines(directory: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, max_batch: int = 1,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, capacity: int | None = None,
                  decode_view: int | None = None, opt_batch: int = 1,
                  workspace_gib: float | None = None) -> dict[str, Path]:
    """Build one serialized engine per graph with its profile into `out_dir` (default DIR/trt) and
    write `engines.json` (profiles, TensorRT version). UNVERIFIED: written to the documented
    TensorRT 10/11 Python API, never run here (no GPU)."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    _require_trt_graph(directory, manifest)
    profiles = trt_profiles(manifest, max_batch=max_batch, prefill_chunk=prefill_chunk, capacity=capacity,
                            decode_view=decode_view, opt_batch=opt_batch)
    trt = import_tensorrt()
    out_dir = Path(out_dir) if out_dir is not None else directory / ENGINE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10: opt in; TensorRT 11: accepted and ignored (always strong)
        flags |= 1 << int(strongly_typed)
    written = {}
    for graph, profile in profiles.items():
        builder = trt.Builder(logger)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(directory / manifest.graphs[graph])):  # reads weights.bin beside it
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {manifest.graphs[graph]}: {errors}")
        config = builder.create_builder_config()
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build the {graph} engine (see the log above)")
        path = out_dir / f"{graph}.engine"
        path.write_bytes(bytes(serialized))
        written[graph] = path
    (out_dir / ENGINE_INDEX).write_text(json.dumps({
        "tensorrt": trt.__version__, "dtype": manifest.dtype, "kv_dtype": manifest.kv_dtype, "engines": {g: p.name for g, p in written.items()},
        "profiles": {g: {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in p.shapes.items()}
                     for g, p in profiles.items()}}, indent=1) + "\n")
    return written


__all__ = ["Profile", "trt_profiles", "check_profiles", "check_trt_graph", "write_trt_commands", "TrtCommands",
           "parse_trtexec_profiles", "sample_inputs", "build_engines"]
