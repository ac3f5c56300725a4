"""Decode graph call time: `decode` (standard-op GEMV attention, past never copied, new K/V out) against
`decode_shared` (in place) with ONNX Runtime's GroupQueryAttention and with kvtrt's CPU kernel
(`runtime/cpu_kernels`, what the engine runs by default); random K/V, inputs bound, 2 threads, the
configurations alternating. Results: `decode_attention.md`.

    python docs/results/decode_attention_speed.py /tmp/smol --past 3072 --batch 1,8 --calls 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kvtrt.runtime.engine as engine_module
from kvtrt.runtime.engine import OrtEngine


def bound_call(engine: OrtEngine, variant: str, batch: int, past: int, rng):
    """(session, binding, arrays kept alive) for one call of `variant` over `past` live tokens per row."""
    m = engine.manifest
    session = engine.session(variant)
    binding = session.io_binding()
    types = {i.name: i.type for i in session.get_inputs()}
    int_type = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    keep = [np.full((batch, 1), 42, np.int64), np.full((batch, 1), past, np.int64)]
    binding.bind_cpu_input("input_ids", keep[0])
    binding.bind_cpu_input("position_ids", keep[1])
    slots = past if variant == "decode" else past + 1  # the in-place graph writes the new token at slot `past`
    mask = np.zeros((batch, slots), int_type.get(types["past_mask"], np.float32))
    mask[:, :past] = 1
    binding.bind_cpu_input("past_mask", mask)
    keep.append(mask)
    if variant == "decode_shared":
        write_slot = np.full((batch,), past, int_type[types["write_slot"]])
        binding.bind_cpu_input("write_slot", write_slot)
        keep.append(write_slot)
    for layer in range(m.n_layers):
        for kind in ("key", "value"):
            cache = rng.standard_normal((batch, m.n_kv_heads, slots, m.head_dim), dtype=np.float32)
            binding.bind_cpu_input(f"past_{kind}.{layer}", cache)
            if variant == "decode_shared":  # present = past: the same buffer
                binding.bind_output(f"present_{kind}.{layer}", "cpu", 0, np.float32, list(cache.shape),
                                    cache.ctypes.data)
            keep.append(cache)
    for output in session.get_outputs():
        if not output.name.startswith("present_"):
            binding.bind_output(output.name, "cpu")
    return session, binding, keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="a kvtrt export with the decode and decode_shared graphs")
    p.add_argument("--past", type=int, default=3072, help="live past tokens per row (default 3072)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--calls", type=int, default=10, help="timed calls per graph and round (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the graphs alternating (default 2)")
    args = p.parse_args()
    engine_module.SHARE_WEIGHTS = False  # plain ONNX Runtime sessions, bound directly
    gqa = OrtEngine(args.export, threads=2, variants=["decode", "decode_shared"], decode_kernel=False)
    kernel = OrtEngine(args.export, threads=2, variants=["decode_shared"], decode_kernel=True)
    configs = [("decode_shared", kernel, "kvtrt kernel"), ("decode_shared", gqa, "GQA"), ("decode", gqa, "GEMV")]
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batch.split(",")):
        for _ in range(args.rounds):
            for variant, engine, label in configs:
                session, binding, _keep = bound_call(engine, variant, batch, args.past, rng)
                session.run_with_iobinding(binding)  # warm-up
                times = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    session.run_with_iobinding(binding)
                    times.append(time.perf_counter() - start)
                print(f"past={args.past} batch={batch} {variant:14s} {label:13s} median {np.median(times) * 1e3:7.2f} ms  "
                      f"best {min(times) * 1e3:7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
