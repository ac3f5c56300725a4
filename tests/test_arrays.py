"""The engine's array types: numpy on the CPU, torch tensors on a GPU (`kvtrt/runtime/arrays.py`).

The dense KV path is written once against them; a GPU cannot run here, so the torch path is run on
CPU tensors and must decode exactly what the numpy path decodes.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import kvtrt
from kvtrt.runtime.arrays import MAPPED_BYTES, NumpyArrays, TorchArrays, host

# (select= pinned: both retrieval paths through both array types; `auto` follows the engine's device)
SPECS = ["full", "kvcrush:budget=0.25,base=snapkv,window=4", "h2o:budget=48,window=4",
         "freekv:budget=48,page=8,sink=4,window=8,min_context=64,select=speculative",
         "freekv:budget=48,page=8,sink=4,window=8,min_context=64,select=previous"]


def test_the_two_array_types_agree_on_every_operation():
    n, t = NumpyArrays(), TorchArrays("cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    index = rng.integers(0, 7, size=(2, 3, 5, 1))
    got_n = n.take_along(x, index, 2)
    got_t = t.take_along(torch.from_numpy(x), torch.from_numpy(index), 2)
    assert got_n.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(got_n, got_t.numpy())
    np.testing.assert_array_equal(got_n[1, 2, 3], x[1, 2, index[1, 2, 3, 0]])
    rows = rng.integers(0, 9, size=(3, 5))
    np.testing.assert_array_equal(n.repeat(rows, 3, 0), t.repeat(torch.from_numpy(rows), 3, 0).numpy())
    mask = np.array([0, 1, 1, 0, 1])
    assert n.nonzero(mask).tolist() == t.nonzero(torch.from_numpy(mask)).tolist() == [1, 2, 4]
    assert n.asarray(5).shape == () == tuple(t.asarray(5).shape)  # a scalar input stays 0-d
    assert n.arange(2, 5).tolist() == t.arange(2, 5).tolist() == [2, 3, 4]
    for a in (n, t):
        small, large = a.zeros((3, 4)), a.zeros((MAPPED_BYTES // 4 + 8,))
        assert float(small.sum()) == 0 and float(large.sum()) == 0
        copy = a.copy(x if a is n else torch.from_numpy(x))
        copy[0] = 0
        assert float(np.abs(x[0]).sum()) > 0  # a copy, not a view
        assert host(a.zeros((2,), np.int64)).dtype == np.int64


def test_large_cpu_buffers_are_memory_maps_that_read_zero():
    a = NumpyArrays()
    big = a.empty((MAPPED_BYTES // 4,), np.float32)
    assert big.base is not None and not big.flags.owndata  # a view of the map, freed with its last view
    assert not big.any()
    big[:3] = 1
    assert big.sum() == 3
    assert a.empty((4,), np.float32).flags.owndata
    if hasattr(os, "fork"):  # a private map: a forked child's writes are its own
        pid = os.fork()
        if pid == 0:
            big[:3] = 7
            os._exit(0)
        os.waitpid(pid, 0)
        assert big[:3].tolist() == [1, 1, 1]


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(5, 261) for _ in range(rng.randrange(100, 300))] for _ in range(n)]


@pytest.mark.parametrize("spec", SPECS)
def test_torch_arrays_decode_what_numpy_arrays_decode(tiny_llama, spec):
    """The GPU engines' array type, on CPU tensors: prefill, batch rows, compaction and retrieval hand-over
    give token-identical greedy output to the CPU runtime's numpy arrays, alone and batched."""
    directory = tiny_llama[2]
    prompts = _prompts(3)
    outputs = []
    for arrays in (None, TorchArrays("cpu")):
        llm = kvtrt.load(directory)
        llm.manifest.eos_token_ids = []
        if arrays is not None:
            llm.engine.arrays = arrays
        alone = [llm.generate(p, max_new_tokens=12, kv=spec).token_ids for p in prompts]
        batched = [r.token_ids for r in llm.generate(prompts, max_new_tokens=12, kv=spec)]
        outputs.append((alone, batched))
        llm.close()
    assert outputs[0][0] == outputs[0][1]  # batched == alone (numpy)
    assert outputs[1] == outputs[0]
