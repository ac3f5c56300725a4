"""Engines run one graph call over pre-allocated arrays bound by pointer (numpy arrays on the CPU,
torch tensors on a GPU: `arrays.py`).

`OrtEngine` drives the exported graphs (prefill, decode and the in-place prefill_shared and
decode_shared when present) through ONNX Runtime IO binding on any execution provider (CPU, CUDA,
TensorRT). The sessions are shared and thread-safe; every
caller owns its `IOBinding`, so concurrent sequences never share state.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from ..contract import LOOKAHEAD, GraphVariant, group_graphs, group_names, input_names, output_names
from ..manifest import ExportMismatchError, Manifest
from .arrays import TORCH_NAMES, for_provider

# torch dtypes (by name: torch is not imported here) of tensors bound on a GPU
NP_DTYPES = {f"torch.{name}": dtype.type for dtype, name in TORCH_NAMES.items()}
DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}  # the KV (and query) dtype of an export
# CPU sessions share one prepacked copy of the weights (see `ort_shared`); False: one Python
# InferenceSession per graph, each prepacking its own copy (the behaviour before; for comparisons).
SHARE_WEIGHTS = True
# With SHARE_WEIGHTS: a tied embedding / lm_head weight stays unpacked, read by the logits MatMul from
# the same mapping its embedding Gather reads, so the table is resident once instead of twice
# (`ort_shared.tied_matmul_weights`). That MatMul has one row per sequence; for one row MLAS reads an
# unpacked weight as fast as a packed one, for several it packs it on every call, so calls of more
# than one sequence go to a twin session of the graph that prepacks it (created on the first such
# call; the other weights stay shared). False: always prepacked (the behaviour before; comparisons).
UNPACK_TIED = True


class _Call:
    """A binding whose session is chosen when its tensors are bound (by batch size, see UNPACK_TIED)."""

    __slots__ = ("variant", "session", "binding")

    def __init__(self, variant):
        self.variant, self.session, self.binding = variant, None, None


PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class Engine(Protocol):
    """What the generator needs from a backend."""

    manifest: Manifest
    device: str  # "cpu" or "cuda:N"
    dtype: np.dtype  # of K/V and queries
    arrays: object  # `arrays.NumpyArrays` or `arrays.TorchArrays`: what `bind` takes

    def new_binding(self, variant: GraphVariant | str): ...

    def bind(self, binding, inputs: dict, outputs: dict) -> None: ...

    def run(self, variant: GraphVariant | str, binding, release_arena: bool = False) -> None: ...


class OrtEngine:
    """ONNX Runtime sessions for an export folder, run through IO binding."""

    def __init__(self, directory: str | os.PathLike, manifest: Manifest | None = None, provider: str = "cpu",
                 threads: int | None = None, device_id: int = 0, variants: Iterable[str] | None = None,
                 decode_kernel: bool | None = None):
        """`variants`: the graphs to load now (default: all); any other graph of the export loads on
        first use. On CPU all sessions share one mapping of the weights file and one prepacked copy
        of the weights (`ort_shared`), so a further graph costs only its own activations.
        `decode_kernel`: run the in-place decode graph's attention with kvtrt's own CPU kernel
        (`cpu_kernels`; default: `KVTRT_DECODE_KERNEL`, else on a CPU with AVX-512 or AVX2 for head size
        64); False keeps
        ONNX Runtime's GroupQueryAttention. `self.decode_attention` says which one runs."""
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(directory)
        if provider not in PROVIDERS:
            raise ValueError(f"provider {provider!r} is unknown; use one of {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider]
        if wanted[0] not in ort.get_available_providers():
            raise RuntimeError(f"provider {provider!r} needs {wanted[0]}, which this onnxruntime lacks "
                               f"(available: {', '.join(ort.get_available_providers())}); install the GPU build "
                               f"with `pip install 'kvtrt[gpu]'` on a machine with an NVIDIA GPU")
        self.provider = provider
        self.device = "cpu" if provider == "cpu" else f"cuda:{device_id}"
        self.dtype = DTYPES[self.manifest.kv_dtype]  # numpy dtype of K/V
        self.arrays = for_provider(provider, device_id)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # The pool threads spin for a while after a call returns; the KV manager and sampling then
        # run on the same cores (FreeKV's recall worker during the next call's setup), and spinning
        # threads starve them: int4 FreeKV at 7680 tokens decoded 75 -> 86 tok/s with the spin
        # stopped, the full cache unchanged.
        config = {"session.force_spinning_stop": "1"}
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        # The default order runs the small score.{l} reductions late, keeping every layer's prefill
        # probability matrix alive at once (5 GB at P=7168, chunk 512); priority order: ~0.4 GB.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        provider_options = []
        for name in wanted:
            if name == "CPUExecutionProvider":
                provider_options.append({})
            else:
                provider_options.append({"device_id": str(device_id)})
        self._session_args = (options, wanted, provider_options)
        # CPU: one prepacked copy of the weights for every graph (ORT's PrepackedWeightsContainer,
        # reached through its C API); SmolLM2 fp32 with both graphs loaded held ~1.3 GB, now ~0.6 GB.
        # Elsewhere (or if the C API is unusable) one Python session per graph, each with its copy.
        self._shared = None
        if provider == "cpu" and SHARE_WEIGHTS:
            from . import cpu_kernels, ort_shared

            if ort_shared.available():
                matmul = cpu_kernels.matmul_setting()
                self._shared = ort_shared.SharedWeights(self.directory, self.manifest.weights_file,
                                                        options.intra_op_num_threads, config,
                                                        unpack_tied=UNPACK_TIED,
                                                        packed_matmul=self._matmul_kernel(matmul),
                                                        packed_min=1 if matmul == "force" else None)
        self._decode_ops = self._decode_kernel(decode_kernel)
        self.decode_attention = "kvtrt" if self._decode_ops is not None else "onnxruntime"
        self._inline: bool | None = None  # `refreshes_inline`, decided on first ask
        self._lock = threading.Lock()
        self._run_options = {}
        self.sessions = {}
        self.packed_sessions = {}  # twins that prepack the tied weight, for calls of several sequences
        for variant in self.manifest.graphs if variants is None else variants:
            self.session(variant)

    def session(self, variant: GraphVariant | str, packed: bool = False):
        """The ONNX Runtime session of graph `variant`, created (and checked) on first use; `packed`:
        its twin with the tied weight prepacked, when this engine leaves it unpacked (else the same)."""
        packed = packed and self._unpacks_tied()
        sessions = self.packed_sessions if packed else self.sessions
        session = sessions.get(variant)
        if session is not None:
            return session
        if variant not in self.manifest.graphs:
            raise ValueError(f"this export has no {variant!r} graph (it has {', '.join(self.manifest.graphs)}); "
                             f"re-export with `kvtrt export` for it")
        import onnxruntime as ort

        with self._lock:
            if variant not in sessions:
                options, wanted, provider_options = self._session_args
                path = self.directory / self.manifest.graphs[variant]
                kernel = self._decode_ops if variant == GraphVariant.DECODE_SHARED else None
                if self._shared is not None:
                    session = self._shared.session(path, unpack_tied=False if packed else None,
                                                   rewrite=self._with_decode_attention if kernel else None,
                                                   custom_ops=kernel)
                elif kernel is not None:
                    options.register_custom_ops_library(str(kernel))
                    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                     str(path.parent))
                    session = ort.InferenceSession(self._with_decode_attention(path.read_bytes()), options,
                                                   providers=wanted, provider_options=provider_options)
                else:
                    session = ort.InferenceSession(str(path), options, providers=wanted,
                                                   provider_options=provider_options)
                self._check(variant, session)
                sessions[variant] = session
            return sessions[variant]

    @property
    def matmul(self) -> str:
        """Which MatMul runs the projections of the loaded graphs: "kvtrt" (PackedMatMul: shared-weight
        CPU sessions with KVTRT_MATMUL_KERNEL=1 or force) or "onnxruntime" (the default)."""
        return "kvtrt" if self._shared is not None and self._shared.packed_names else "onnxruntime"

    @property
    def refreshes_inline(self) -> bool:
        """Whether FreeKV/Quest views can be refreshed inside decode_shared's attention (`select=inline`):
        kvtrt's kernel runs it and the C page ops are built (the op's hook is installed on first ask)."""
        if self._inline is None:
            from .cpu_kernels import page_ops

            self._inline = self._decode_ops is not None and page_ops.install_refresh_hook(self._decode_ops)
        return self._inline

    def _decode_kernel(self, wanted: bool | None) -> Path | None:
        """The `cpu_kernels` library to run decode_shared's attention with, or None (GroupQueryAttention)."""
        from . import cpu_kernels

        if GraphVariant.DECODE_SHARED not in self.manifest.graphs or self.provider != "cpu":
            if wanted:
                raise ValueError("decode_kernel=True needs the CPU provider and an export with the in-place "
                                 "decode graph (`kvtrt export --attention gqa`, the fp32 default)")
            return None
        wanted = cpu_kernels.setting() if wanted is None else wanted
        if wanted is False:
            return None
        library = cpu_kernels.library()
        if library is None:
            if wanted:
                raise RuntimeError(f"kvtrt's decode attention kernel cannot be built: {cpu_kernels.unavailable()}")
            cpu_kernels.warn_unavailable()
        elif wanted is None and not (cpu_kernels.vectorised(library) and self.manifest.head_dim in cpu_kernels.HEAD_DIMS):
            return None  # only the portable path would run (no AVX-512/AVX2, another head size): GQA is faster
        return library

    @staticmethod
    def _matmul_kernel(mode: str) -> Path | None:
        """The `cpu_kernels` library with PackedMatMul when `mode` (`cpu_kernels.matmul_setting()`) asks for
        it (on: needs its AVX-512 path; force: any build), else None (off: ONNX Runtime's MatMul, the default)."""
        from . import cpu_kernels

        if mode == "off":
            return None
        library = cpu_kernels.library("packed_matmul")
        if library is None:
            raise RuntimeError(f"KVTRT_MATMUL_KERNEL={mode}, but kvtrt's MatMul kernel cannot be built: "
                               f"{cpu_kernels.unavailable()}; unset KVTRT_MATMUL_KERNEL for ONNX Runtime's MatMul")
        if mode == "on" and not cpu_kernels.vectorised(library):
            raise RuntimeError("KVTRT_MATMUL_KERNEL=1 needs a CPU with AVX-512 (only the kernel's portable loops, "
                               "far slower than ONNX Runtime's MatMul, would run here): unset it, or set it to "
                               "force to run them anyway")
        return library

    def _with_decode_attention(self, model: bytes) -> bytes:
        from .cpu_kernels import with_decode_attention

        return with_decode_attention(model, half=self.manifest.kv_dtype == "fp16")

    def _unpacks_tied(self) -> bool:
        return self._shared is not None and bool(self._shared.unpacked)

    def _names(self, key: str) -> tuple[list[str], list[str]]:
        """The inputs and outputs graph `key` must have (a variant, a decode group or the lookahead graph)."""
        m = self.manifest
        for group, layers, following in group_graphs(m.decode_groups):
            if key == group:
                return group_names(layers, following, m.n_layers)
        return input_names(m.n_layers, key), output_names(m.n_layers, key)

    def _check(self, variant: GraphVariant | str, session) -> None:
        m = self.manifest
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        want_in, want_out = self._names(variant)
        if got_in != want_in or got_out != want_out:
            raise ExportMismatchError(
                f"{variant} graph in {self.directory} does not have the inputs/outputs of its manifest "
                f"({m.n_layers} layers): re-export the model with `kvtrt export`")
        if variant == LOOKAHEAD:
            return
        past = session.get_inputs()[next(i for i, name in enumerate(got_in) if name.startswith("past_key."))]
        kv_heads = 1 if variant == GraphVariant.DECODE_HEADS else m.n_kv_heads  # decode_heads: one pool per layer
        if past.shape[1] != kv_heads or past.shape[3] != m.head_dim:
            raise ExportMismatchError(
                f"{variant} graph in {self.directory} has past_key shape {past.shape}, manifest says "
                f"{m.n_kv_heads} KV heads x {m.head_dim}: re-export the model with `kvtrt export`")
        want_type = "tensor(float16)" if m.kv_dtype == "fp16" else "tensor(float)"
        if past.type != want_type:
            raise ExportMismatchError(f"{variant} graph stores KV as {past.type} but the manifest says {m.kv_dtype}: "
                                      f"re-export the model with `kvtrt export`")
        logits = session.get_outputs()[0]  # its vocab dim is unknown when PackedMatMul makes it (no shape inference)
        if logits.name == "logits" and logits.shape[-1] not in (None, m.vocab_size):
            raise ExportMismatchError(f"{variant} graph has vocab {logits.shape[-1]}, manifest {m.vocab_size}: "
                                      f"re-export the model")

    def new_binding(self, variant: GraphVariant | str):
        """A fresh IOBinding for graph `variant`; one per caller."""
        session = self.session(variant)
        if self._unpacks_tied():
            return _Call(variant)  # the session is chosen in `bind`, by batch size
        return session.io_binding()

    def bind(self, binding, inputs: dict, outputs: dict) -> None:
        """Bind contiguous arrays (numpy, or torch tensors) by pointer (no copy)."""
        if isinstance(binding, _Call):
            ids = inputs.get("input_ids")
            session = self.session(binding.variant, packed=ids is not None and ids.shape[0] > 1)
            if session is not binding.session:
                binding.session, binding.binding = session, session.io_binding()
            binding = binding.binding
        for name, tensor in inputs.items():
            binding.bind_input(name, *self._address(tensor))
        for name, tensor in outputs.items():
            binding.bind_output(name, *self._address(tensor))

    @staticmethod
    def _address(tensor):
        if isinstance(tensor, np.ndarray):
            if not tensor.flags.c_contiguous:
                raise ValueError("bound arrays must be contiguous")
            return "cpu", 0, tensor.dtype.type, tensor.shape, tensor.ctypes.data
        if not tensor.is_contiguous():
            raise ValueError("bound tensors must be contiguous")
        device = "cpu" if tensor.device.type == "cpu" else "cuda"
        return device, tensor.device.index or 0, NP_DTYPES[str(tensor.dtype)], tuple(tensor.shape), tensor.data_ptr()

    def run(self, variant: GraphVariant | str, binding, release_arena: bool = False) -> None:
        """One graph call on the bound tensors. `release_arena` (CPU): the session's memory arena hands
        the call's activation memory back when it ends (ORT's arena shrinkage), for a call after which the
        graph will not run again soon (a prompt's last prefill chunk: decoding follows, in other graphs)."""
        if isinstance(binding, _Call):
            session, binding = binding.session, binding.binding
        else:
            session = self.sessions[variant]
        if release_arena and self.provider == "cpu":
            session.run_with_iobinding(binding, self._release_options(session))
        else:
            session.run_with_iobinding(binding)
        if self.provider != "cpu":
            binding.synchronize_outputs()

    def _release_options(self, session):
        """Run options that shrink the CPU arena after the call (ORT's or `ort_shared`'s kind, as the session)."""
        kind = "shared" if type(session).__module__.endswith("ort_shared") else "python"
        options = self._run_options.get(kind)
        if options is None:
            if kind == "shared":
                from .ort_shared import RunOptions
            else:
                from onnxruntime import RunOptions
            options = RunOptions()
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            self._run_options[kind] = options
        return options
