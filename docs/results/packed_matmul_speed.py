"""The 210 projection MatMuls of SmolLM2 (30 layers x q, k, v, o, gate, up, down; random weights of their
shapes) in one ONNX graph, run for M rows by ONNX Runtime's MatMul (MLAS, prepacked at session creation)
and by kvtrt's PackedMatMul (weights in 48-column panels), alternating, median of N calls each.
The rows are a batched decode step's (M = 1, 8, 16) or a prefill chunk's (512). Results: `packed_matmul.md`.

    python docs/results/packed_matmul_speed.py --rows 1,8,16,64,512 --repeat 15    # THREADS=1 for one thread
"""

import argparse
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kvtrt.runtime import cpu_kernels

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o gate up down


def model(layers: int, packed: bool) -> tuple[bytes, dict]:
    """One graph: x [M,576] and h [M,1536] in, each projection's output out; the weights are
    initializers (packed or not)."""
    rng = np.random.default_rng(0)
    nodes, outputs, weights = [], [], {}
    for layer in range(layers):
        for i, (k, n) in enumerate(SHAPES):
            name = f"w{layer}_{i}"
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            weights[name] = cpu_kernels.pack_panels(w) if packed else w
            nodes.append(helper.make_node("MatMul", ["x" if k == 576 else "h", name], [f"y{layer}_{i}"]))
            outputs.append(helper.make_tensor_value_info(f"y{layer}_{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "projections", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 576]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, ["M", 1536])], outputs)
    for name, w in weights.items():
        graph.initializer.append(numpy_helper.from_array(w, name))
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    if packed:
        raw = cpu_kernels.with_packed_matmul(raw, set(weights))
    return raw, weights


def session(raw: bytes, packed: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("THREADS", "2"))
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as the engine: no spinning between calls
    if packed:
        options.register_custom_ops_library(str(cpu_kernels.library("packed_matmul")))
    return ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,64,512", help="comma-separated M values (rows per call)")
    parser.add_argument("--repeat", type=int, default=20, help="calls per engine and M (median reported)")
    parser.add_argument("--layers", type=int, default=30, help="layers of projections (SmolLM2: 30)")
    args = parser.parse_args()
    sessions = {packed: session(model(args.layers, packed)[0], packed) for packed in (False, True)}
    print("| M | ONNX Runtime MatMul (ms) | kvtrt PackedMatMul (ms) | ratio |\n|---|---|---|---|")
    for m in (int(v) for v in args.rows.split(",")):
        rng = np.random.default_rng(m)
        feed = {"x": rng.standard_normal((m, 576)).astype(np.float32),
                "h": rng.standard_normal((m, 1536)).astype(np.float32)}
        first = {packed: s.run(None, feed) for packed, s in sessions.items()}
        worst = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30)) for a, b in zip(first[False], first[True]))
        assert worst < 1e-5, f"outputs differ at M={m}: {worst}"
        times = {False: [], True: []}
        for _ in range(args.repeat):
            for packed, s in sessions.items():  # alternating
                start = time.perf_counter()
                s.run(None, feed)
                times[packed].append(1000 * (time.perf_counter() - start))
        old, new = (float(np.median(times[p])) for p in (False, True))
        print(f"| {m} | {old:.1f} | {new:.1f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
