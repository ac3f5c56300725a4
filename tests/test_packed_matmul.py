"""kvtrt's PackedMatMul (`runtime/cpu_kernels/packed_matmul.c`): the panel layout, the kernel against numpy,
a row's result independent of the other rows of the call, which weights the engine hands it, and the
engine's outputs against ONNX Runtime's MatMul. (Every other test of the suite also runs it: conftest sets
KVTRT_MATMUL_KERNEL=force, so the tiny models' weights go through it too.)"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvtrt.runtime import cpu_kernels, ort_shared
from kvtrt.runtime.cpu_kernels import PANEL, pack_panels
from kvtrt.runtime.engine import OrtEngine


def _library():
    path = cpu_kernels.library("packed_matmul")
    if path is None:
        pytest.skip(f"the kernel library cannot be built here: {cpu_kernels.unavailable()}")
    lib = ctypes.CDLL(str(path))
    f = ctypes.POINTER(ctypes.c_float)
    lib.kvtrt_packed_matmul.argtypes = [f, f, f, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    return lib


def _matmul(lib, a: np.ndarray, panels: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    y = np.full((a.shape[0], panels.shape[1]), np.nan, np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # noqa: E731
    lib.kvtrt_packed_matmul(ptr(a), ptr(panels), ptr(y), a.shape[0], a.shape[1], panels.shape[1])
    return y


def test_pack_panels_layout():
    K, N = 3, 2 * PANEL + 4  # two whole panels and a 4-column one
    w = np.arange(K * N, dtype=np.float32).reshape(K, N)
    flat = pack_panels(w).reshape(-1)
    assert pack_panels(w).shape == (K, N)
    for k in range(K):
        for n in range(N):
            p, j = divmod(n, PANEL)
            width = min(PANEL, N - p * PANEL)
            assert flat[p * PANEL * K + k * width + j] == w[k, n]


@pytest.mark.parametrize("K,N", [(300, 100), (64, 96), (37, 5)])
def test_kernel_equals_numpy(K, N):
    lib = _library()
    rng = np.random.default_rng(K + N)
    w = rng.standard_normal((K, N), dtype=np.float32)
    panels = pack_panels(w)
    for rows in (1, 3, 8, 9, 70):
        a = rng.standard_normal((rows, K), dtype=np.float32)
        want = a.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(_matmul(lib, a, panels), want, rtol=1e-4, atol=1e-4 * np.sqrt(K))


def test_a_row_does_not_depend_on_the_other_rows():
    """Bit for bit: each row computed alone, in a tile of 8, in a second block of 64 rows."""
    lib = _library()
    rng = np.random.default_rng(0)
    K, N = 576, 3 * PANEL + 16
    panels = pack_panels(rng.standard_normal((K, N), dtype=np.float32))
    a = rng.standard_normal((75, K), dtype=np.float32)
    together = _matmul(lib, a, panels)
    for r in (0, 5, 7, 8, 63, 64, 74):
        alone = _matmul(lib, a[r:r + 1], panels)
        assert np.array_equal(alone[0], together[r]), r
    assert np.array_equal(_matmul(lib, a[3:11], panels), together[3:11])


def _names_by_use(directory):
    graph = directory / "decode_shared.onnx"
    return ({t.name for t in ort_shared.packed_matmul_weights(graph)},
            {t.name for t in ort_shared.packed_matmul_weights(graph, smallest=1)},
            {t.name for t in ort_shared.tied_matmul_weights(graph)})


def test_which_weights_the_engine_packs(tiny_llama, monkeypatch):
    _, _, directory = tiny_llama
    default, every, tied = _names_by_use(directory)
    assert default == set()  # the tiny model's projections are below MIN_PACKED
    assert every and not every & tied  # a tied embedding table is read by a Gather too: never packed
    assert all(("qkv" in n or "_o_" in n or "gate_up" in n or "down" in n or "rope" in n) for n in every), every

    monkeypatch.setenv("KVTRT_MATMUL_KERNEL", "force")
    engine = OrtEngine(directory, threads=1, variants=["prefill_shared", "decode_shared"])
    if not ort_shared.available():
        pytest.skip("the shared-weight sessions (ONNX Runtime's C API) are not available")
    assert engine.matmul == "kvtrt" and engine._shared.packed_names == every
    monkeypatch.setenv("KVTRT_MATMUL_KERNEL", "0")
    assert OrtEngine(directory, threads=1, variants=["decode_shared"]).matmul == "onnxruntime"
    monkeypatch.delenv("KVTRT_MATMUL_KERNEL")  # the default: ONNX Runtime's MatMul
    assert OrtEngine(directory, threads=1, variants=["decode_shared"]).matmul == "onnxruntime"
    if cpu_kernels.vectorised(cpu_kernels.library("packed_matmul")):
        monkeypatch.setenv("KVTRT_MATMUL_KERNEL", "1")
        assert OrtEngine(directory, threads=1, variants=["decode_shared"]).matmul == "onnxruntime"  # nothing large


def test_settings_and_their_errors(tiny_llama, monkeypatch):
    """KVTRT_MATMUL_KERNEL: an unknown value names the accepted ones; 1 without the AVX-512 path is refused
    with the two ways out (unset, force), and nothing is loaded."""
    _, _, directory = tiny_llama
    monkeypatch.setenv("KVTRT_MATMUL_KERNEL", "fast")
    with pytest.raises(ValueError, match="'fast' is not a setting.*0.*1.*force"):
        OrtEngine(directory, threads=1, variants=["decode_shared"])
    monkeypatch.setenv("KVTRT_MATMUL_KERNEL", "1")
    monkeypatch.setattr(cpu_kernels, "vectorised", lambda path: False)
    with pytest.raises(RuntimeError, match="needs a CPU with AVX-512.*unset it.*force"):
        OrtEngine(directory, threads=1, variants=["decode_shared"])


def test_outputs_equal_onnxruntime_matmul(tiny_llama, monkeypatch):
    """The same logits as ONNX Runtime's MatMul to rounding, and the same greedy tokens, alone and batched."""
    import kvtrt
    from tiny import random_prompt

    _, _, directory = tiny_llama
    prompts = [random_prompt(n, seed=n) for n in (5, 40, 90)]
    out = {}
    for setting in ("force", "0"):
        monkeypatch.setenv("KVTRT_MATMUL_KERNEL", setting)
        llm = kvtrt.load(directory, threads=1)
        assert llm.engine.matmul == ("kvtrt" if setting == "force" else "onnxruntime")
        alone = [llm.generate(p, max_new_tokens=12, temperature=0, logprobs=3) for p in prompts]
        batched = llm.generate(prompts, max_new_tokens=12, temperature=0)
        assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
        out[setting] = alone
    for kernel, reference in zip(out["force"], out["0"]):
        assert kernel.token_ids == reference.token_ids
        got = [[lp for _, lp in t.top] for t in kernel.logprobs]
        want = [[lp for _, lp in t.top] for t in reference.logprobs]
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_smollm2_packs_its_projections(smollm2):
    """The default on the real model: the 4 projections of each of its 30 layers, not the tied lm_head."""
    _, _, directory = smollm2
    default, _, tied = _names_by_use(directory)
    assert len(default) == 4 * 30 and not default & tied
    assert {n.split("_")[1] for n in default} == {str(i) for i in range(30)}
