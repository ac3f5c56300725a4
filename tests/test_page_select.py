"""The host's page selection as one ONNX Runtime graph (`kv/page_select.py`) against numpy's
`pages.select_pages`, and its hand-written models against the ONNX checker."""

from __future__ import annotations

import numpy as np
import pytest

from kvtrt.runtime.kv import pages as P
from kvtrt.runtime.kv.page_select import model_bytes, select_pages_host


def _summaries(rng, shape):
    kmin = rng.standard_normal(shape).astype(np.float32)
    return kmin, kmin + np.abs(rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("combine", ["softmax", "mean"])
def test_page_select_graph_equals_numpy(combine):
    """The ONNX Runtime selection picks what `pages.select_pages` picks: every layer at once, one layer,
    sequences with different page counts (one with none), k beyond the pages, tied scores."""
    rng = np.random.default_rng(0)
    for lead, n_pages, k in (((4,), [40], 7), ((), [40], 7), ((3,), [40, 13, 0], 9), ((2,), [5, 30], 50)):
        batch = len(n_pages)
        query = rng.standard_normal((*lead, batch, 6, 16)).astype(np.float32)
        kmin, kmax = _summaries(rng, (*lead, batch, 2, 48, 16))
        want = P.select_pages(query, kmin, kmax, np.array(n_pages), k, combine)
        got = select_pages_host(query, kmin, kmax, np.array(n_pages), k, combine, threads=2)
        assert got.dtype == np.int64 and np.array_equal(got, want), (lead, n_pages, k)
    flat = np.zeros((2, 1, 2, 48, 16), np.float32)  # every page scores the same: the lowest ids, in order
    got = select_pages_host(np.ones((2, 1, 6, 16), np.float32), flat, flat, np.array([33]), 8, combine)
    assert np.array_equal(got, np.broadcast_to(np.arange(8), got.shape))


def test_page_select_models_are_valid_onnx():
    onnx = pytest.importorskip("onnx")
    for combine in ("softmax", "mean"):
        onnx.checker.check_model(onnx.load_from_string(model_bytes(combine)), full_check=True)
    with pytest.raises(ValueError, match="combine='max'"):
        model_bytes("max")
