"""The ONNX Runtime gather-and-widen a recall from an fp16 page pool uses on the CPU (kv/host_gather.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtrt.runtime.kv.host_gather import gather_widened, model_bytes


def test_the_handwritten_graph_is_a_valid_onnx_model():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(model_bytes())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Gather", "Cast"]
    assert [i.name for i in model.graph.input] == ["data", "rows"] and model.graph.output[0].name == "out"


def test_gather_widened_equals_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 2, 3, 8)).astype(np.float16)
    specials = np.array([np.inf, -np.inf, np.nan, 6e-8, -6e-8, 0.0, -0.0, 65504.0], dtype=np.float16)
    data[7, 0, 0] = specials  # infinities, NaN, subnormals, signed zeros, the largest half
    rows = np.array([7, 0, 49, 7, 3], dtype=np.int64)  # repeats allowed
    out = gather_widened(data, rows)
    want = data[rows].astype(np.float32)
    assert out.dtype == np.float32 and out.shape == (5, 2, 3, 8)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))  # the same bits, NaN and -0.0 included
    assert gather_widened(data, np.zeros(0, np.int64)).shape == (0, 2, 3, 8)


def test_the_handwritten_narrowing_graph_is_a_valid_onnx_model():
    onnx = pytest.importorskip("onnx")
    from kvtrt.runtime.kv.host_gather import narrow_model_bytes

    onnx.checker.check_model(onnx.load_from_string(narrow_model_bytes()), full_check=True)


def test_narrowed_equals_numpy_bit_for_bit_contiguous_or_not():
    from kvtrt.runtime.kv.host_gather import narrowed

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 40, 8)) * 3000).astype(np.float32)
    x[0, 0, :7] = [np.inf, -np.inf, np.nan, 1e-9, 70000.0, 65520.0, -65519.0]  # overflow, ties, underflow
    for part in (x, x[:, 5:29]):  # a slice of every head's tokens is not contiguous
        with np.errstate(over="ignore"):
            want = part.astype(np.float16)
        got = narrowed(part)
        assert got.dtype == np.float16 and got.flags.c_contiguous
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
