"""Decode call time with variants of `kvtrt/runtime/cpu_kernels/decode_attention.c` side by side: each source is
built with the flags the runtime uses (plus $EXTRA, e.g. EXTRA=-mno-avx512f for the AVX2 path), loaded into its
own session of the export's `decode_shared` graph over the same random K/V (bound in place), and the sessions'
calls alternate; prints the median and minimum per source and whether all variants return the same logits bit
for bit. Results: `decode_attention.md`.

    git show HEAD~1:kvtrt/runtime/cpu_kernels/decode_attention.c > /tmp/before.c
    python docs/results/kernel_variants_speed.py /tmp/smol16 --batch 8 --past 3072 --calls 12 \
        /tmp/before.c kvtrt/runtime/cpu_kernels/decode_attention.c
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort

from kvtrt.runtime import cpu_kernels
from kvtrt.runtime.engine import OrtEngine


def session(model: bytes, folder: str, library: str, batch: int, past: int, manifest):
    """(session, binding, K/V kept alive) for one call over `past` live slots per row, the new token at `past`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    options.register_custom_ops_library(library)
    s = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)  # the same K/V for every variant
    dtype = np.float16 if manifest.kv_dtype == "fp16" else np.float32
    binding, cache = s.io_binding(), {}
    for i in s.get_inputs():
        if i.name in ("input_ids", "position_ids"):
            binding.bind_cpu_input(i.name, np.full((batch, 1), 42 if i.name == "input_ids" else past, np.int64))
        elif i.name == "past_mask":
            binding.bind_cpu_input(i.name, np.ones((batch, past + 1), np.int64))
        elif i.name == "write_slot":
            binding.bind_cpu_input(i.name, np.full((batch,), past, np.int32 if "int32" in i.type else np.int64))
        else:  # past_key.{l} / past_value.{l}, also the present outputs (in place)
            shape = (batch, manifest.n_kv_heads, past + 1, manifest.head_dim)
            cache[i.name] = ort.OrtValue.ortvalue_from_numpy((rng.standard_normal(shape) * 0.5).astype(dtype))
            binding.bind_ortvalue_input(i.name, cache[i.name])
    for o in s.get_outputs():
        if o.name.startswith("present"):
            binding.bind_ortvalue_output(o.name, cache[o.name.replace("present", "past")])
        else:
            binding.bind_output(o.name)
    return s, binding, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("sources", nargs="+", help="decode_attention.c variants")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--past", type=int, default=3072)
    parser.add_argument("--calls", type=int, default=12)
    args = parser.parse_args()
    engine = OrtEngine(args.dir, threads=2, variants=[])
    path = engine.directory / engine.manifest.graphs["decode_shared"]
    model = engine._with_decode_attention(path.read_bytes())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, source in enumerate(args.sources):
            library = os.path.join(tmp, f"variant{i}.so")
            subprocess.run([os.environ.get("CC", "cc"), *cpu_kernels.FLAGS, *os.environ.get("EXTRA", "").split(),
                            source, "-o", library, "-lm"], check=True)
            runs.append((source, *session(model, str(path.parent), library, args.batch, args.past, engine.manifest)))
        times = {source: [] for source, *_ in runs}
        for call in range(args.calls + 2):  # two warm-up calls each
            for source, s, binding, _ in runs:
                start = time.perf_counter()
                s.run_with_iobinding(binding)
                if call >= 2:
                    times[source].append(1000 * (time.perf_counter() - start))
        logits = [binding.copy_outputs_to_cpu()[0] for _, _, binding, _ in runs]
    print(f"{args.dir}: batch {args.batch} x {args.past} tokens, {args.calls} calls each")
    for source, t in times.items():
        print(f"  {source:60s} median {statistics.median(t):6.1f} ms  min {min(t):6.1f}")
    print("  logits identical:", all(np.array_equal(logits[0], x) for x in logits[1:]))


if __name__ == "__main__":
    main()
