"""Time the prototype decode attention kernel (`decode_attention_kernel.c`, plain C with OpenMP, called through
ctypes on numpy arrays) over 30 layers of SmolLM2's shapes, and check it against numpy. Needs gcc.

    python docs/results/decode_attention_kernel.py --batch 8 --past 3072
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64  # SmolLM2-135M


def build() -> ctypes.CDLL:
    source = Path(__file__).with_name("decode_attention_kernel.c")
    library = Path(tempfile.mkdtemp()) / "libattn.so"
    subprocess.run(["gcc", "-O3", "-mavx2", "-mfma", "-ffast-math", "-fopenmp", "-shared", "-fPIC", str(source),
                    "-o", str(library), "-lmvec", "-lm"], check=True)
    return ctypes.CDLL(str(library))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="rows (default 8)")
    p.add_argument("--past", type=int, default=3072, help="live tokens per row (default 3072)")
    p.add_argument("--calls", type=int, default=10, help="timed calls of all layers (default 10)")
    p.add_argument("--kernel", choices=("plain", "avx512"), default="plain",
                   help="the plain C loops (default) or the AVX-512 one (g = 3; needs a CPU with avx512f)")
    args = p.parse_args()
    lib, floats = build(), ctypes.POINTER(ctypes.c_float)
    if args.kernel == "avx512" and "avx512f" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("--kernel avx512 needs a CPU with avx512f; this one has none (use --kernel plain)")
    attend = lib.attend_avx512 if args.kernel == "avx512" else lib.attend
    rng = np.random.default_rng(0)
    shape = (args.batch, KV_HEADS, args.past, HEAD_DIM)
    keys = [rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)]
    values = [rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)]
    query = rng.standard_normal((args.batch, KV_HEADS, GROUP, HEAD_DIM), dtype=np.float32)  # [B,Hkv,g,D]
    out = np.empty_like(query)
    lengths = np.full(args.batch, args.past, np.int64)

    def run(threads: int) -> None:
        for k, v in zip(keys, values):
            attend(query.ctypes.data_as(floats), k.ctypes.data_as(floats), v.ctypes.data_as(floats),
                       lengths.ctypes.data_as(ctypes.POINTER(ctypes.c_long)), out.ctypes.data_as(floats),
                       args.batch, KV_HEADS, GROUP, ctypes.c_long(args.past), threads)

    run(2)
    scores = np.einsum("bhgd,bhtd->bhgt", query, keys[-1]) / np.sqrt(HEAD_DIM)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    print(f"max |kernel - numpy| on the last layer: {np.abs(np.einsum('bhgt,bhtd->bhgd', probs, values[-1]) - out).max():.2e}")
    gigabytes = LAYERS * 2 * np.prod(shape) * 4 / 1e9
    for threads in (1, 2):
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            run(threads)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"batch {args.batch}, {args.past} tokens, {threads} thread(s): {median * 1e3:.1f} ms for {LAYERS} layers, "
              f"{gigabytes / median:.1f} GB/s")


if __name__ == "__main__":
    main()
