"""The array backends retrieval runs on (kvtrt.runtime.kv.backend): the numpy one's own mechanics."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from kvtrt.runtime.arrays import NumpyArrays
from kvtrt.runtime.kv.backend import NumpyBackend, TorchBackend


def test_reshape_view_never_copies():
    xp = NumpyBackend()
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    view = xp.reshape_view(x[:, 1:], (2, 2, 2, 2))  # splitting a contiguous last axis: a view
    view[...] = -1
    assert (x[:, 1:] == -1).all() and (x[:, 0] >= 0).all()
    with pytest.raises(AttributeError):  # merging non-adjacent memory would need a copy
        xp.reshape_view(x[:, :, 1:], (2, 9))


def test_weak_buffers_follow_the_owner_and_see_it_freed():
    xp = NumpyBackend()
    mapped = NumpyArrays().empty((4, 1 << 17), np.float32)  # 2 MiB: an anonymous map
    refs = xp.weak_buffers([mapped[1], mapped[2:]])  # two views, one buffer
    assert len(refs) == 1 and refs[0][1] == mapped.nbytes and refs[0][0]() is not None
    del mapped
    gc.collect()
    assert refs[0][0]() is None
    raw = np.frombuffer(b"\0" * 64, dtype=np.float32)  # owned by bytes, which take no weak reference
    (ref, size), = xp.weak_buffers([raw])
    assert size == 64 and ref() is raw


def test_cosine_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7, 16), dtype=np.float32), rng.standard_normal((5, 7, 16), dtype=np.float32)
    a[0, 0] = 0  # a zero vector: the eps clamp
    got = NumpyBackend().cosine(a, b)
    want = TorchBackend("cpu").cosine(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("count", [3, 200])  # below and above ORT_CAST_MIN values: numpy, then ONNX Runtime
def test_half_precision_casts_are_exact_either_way(count):
    from kvtrt.runtime.kv import backend as backend_module

    xp = NumpyBackend()
    rng = np.random.default_rng(2)
    pool = (rng.standard_normal((300, 2, 64)) * 100).astype(np.float16)
    rows = rng.integers(0, 300, count)
    assert (count * 128 >= backend_module.ORT_CAST_MIN) == (count == 200)
    np.testing.assert_array_equal(xp.take_rows(pool, rows, "float32"), pool[rows].astype(np.float32))
    x = rng.standard_normal((count, 128)).astype(np.float32)
    assert np.array_equal(xp.cast(x, "float16").view(np.uint16), x.astype(np.float16).view(np.uint16))
