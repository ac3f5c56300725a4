"""FreeKV's page selection and recall in C (`cpu_kernels/page_ops.c`) against the numpy code they replace
(`pages.select_pages`, `freekv._placement` + `KVView.put_pages`)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtrt.runtime import cpu_kernels
from kvtrt.runtime.cpu_kernels import page_ops
from kvtrt.runtime.kv import pages as P
from kvtrt.runtime.kv.backend import backend_for
from kvtrt.runtime.kv.freekv import FreeKVRetrieval, _placement
from kvtrt.runtime.kv.spec import parse_kv_spec
from kvtrt.runtime.kv.views import KVView

pytestmark = pytest.mark.skipif(cpu_kernels.library("page_ops") is None,
                                reason=f"no C page ops: {cpu_kernels.unavailable()}")


def _summaries(rng, shape):
    """float16 summaries, as the pool keeps them on the host."""
    kmin = rng.standard_normal(shape).astype(np.float32)
    return P.outward_fp16(kmin, kmin + np.abs(rng.standard_normal(shape)).astype(np.float32))


@pytest.mark.parametrize("combine", ["softmax", "mean"])
def test_select_equals_numpy(combine):
    """Every layer at once, one layer, sequences with different page counts (one with none), k beyond the
    pages, head size 64 (the vector loop) and 20 (its tail), tied scores to the lower id; `only` rows."""
    rng = np.random.default_rng(0)
    for lead, n_pages, k, dim in (((4,), [40], 7, 64), ((), [40], 7, 20), ((3,), [40, 13, 0], 9, 64),
                                  ((2,), [5, 30], 50, 16)):
        batch = len(n_pages)
        query = rng.standard_normal((*lead, batch, 6, dim)).astype(np.float32)
        kmin, kmax = _summaries(rng, (*lead, batch, 2, 48, dim))
        want = P.select_pages(query, kmin, kmax, np.array(n_pages), k, combine)
        got = page_ops.select(query, kmin, kmax, np.array(n_pages), k, combine)
        assert got.dtype == np.int64 and np.array_equal(got, want), (lead, n_pages, k)
        only = rng.random(want.shape[:-1]) < 0.5
        got = page_ops.select(query, kmin, kmax, np.array(n_pages), k, combine, only=only)
        assert np.array_equal(got, np.where(only[..., None], want, -1))
    flat = np.zeros((2, 1, 2, 48, 16), np.float16)  # every page scores the same: the lowest ids, in order
    got = page_ops.select(np.ones((2, 1, 6, 16), np.float32), flat, flat, np.array([33]), 8, combine)
    assert np.array_equal(got, np.broadcast_to(np.arange(8), got.shape))
    with pytest.raises(ValueError, match="combine='max'"):
        page_ops.select(query, kmin, kmax, np.array(n_pages), k, "max")


@pytest.mark.parametrize("combine", ["softmax", "mean"])
def test_select_equals_numpy_many_pages(combine):
    """8-token pages of 7680 tokens: the top 119 of 960 pages (953 in the second sequence: a last partial
    vector of 16), every layer. Values on a quarter grid, so each bound is exact in any summation order and
    the many exact ties must go to the lower id as numpy orders them."""
    rng = np.random.default_rng(1)
    query = np.round(rng.standard_normal((3, 2, 9, 64)) * 4).astype(np.float32) / 4
    kmin = (np.round(rng.standard_normal((3, 2, 3, 960, 64)) * 4) / 4).astype(np.float16)
    kmax = kmin + (np.round(np.abs(rng.standard_normal(kmin.shape)) * 4) / 4).astype(np.float16)
    n_pages = np.array([960, 953])
    want = P.select_pages(query, kmin, kmax, n_pages, 119, combine)
    assert np.array_equal(page_ops.select(query, kmin, kmax, n_pages, 119, combine), want)
    assert np.array_equal(page_ops.select(query, kmin, kmax, n_pages, 119, combine, threads=2), want)


@pytest.mark.parametrize("pool_dtype,view_dtype", [("float32", "float32"), ("float16", "float32"),
                                                   ("float16", "float16")])
def test_recall_equals_placement_and_put_pages(pool_dtype, view_dtype):
    """From a view already holding pages: the same slot map, the same view bytes and the same counts as
    the numpy placement and copy, for every layer and for a range of layers."""
    rng = np.random.default_rng(1)
    L, B, Hkv, D, page, cap, k = 4, 2, 3, 8, 4, 20, 6
    lay = parse_kv_spec(f"freekv:budget={k * page + 12},page={page},sink=4,window=8").retrieval.layout(None, True)
    assert lay.k_pages == k
    pool = P.PagePool(L, B, Hkv, D, page, view_dtype, capacity=cap,
                      pool_dtype="fp16" if pool_dtype == "float16" else "fp32")
    pool.data[...] = rng.standard_normal(pool.data.shape).astype(pool.data.dtype)
    xp = backend_for("cpu")
    views = [KVView(0, lay, L, B, Hkv, D, np.dtype(view_dtype), xp, np.int64) for _ in range(2)]
    held = np.stack([rng.permutation(cap)[:k] for _ in range(L * B * Hkv)]).reshape(L, B, Hkv, k)
    held[rng.random(held.shape) < 0.3] = -1
    fill = rng.standard_normal(views[0].all_kv.shape).astype(view_dtype)
    for v in views:
        v.all_kv[...] = fill
        v.slot_pages[...] = held
    # the next selection: some pages kept (in another order), some new, some rows with fewer pages
    selected = np.stack([rng.permutation(cap)[:k] for _ in range(L * B * Hkv)]).reshape(L, B, Hkv, k)
    selected[..., :2] = held[..., 2:4]
    selected[rng.random(selected.shape) < 0.2] = -1
    for layers in (None, range(1, 3)):
        want_view, got_view = views
        for v in views:
            v.all_kv[...] = fill
            v.slot_pages[...] = held
        rows = slice(None) if layers is None else slice(layers.start, layers.stop)
        plan = _placement(xp, want_view.slot_pages[rows], selected[rows])
        lay_layers = plan.layers + (0 if layers is None else layers.start)
        want_view.put_pages(pool, lay_layers, plan.seqs, plan.heads, plan.slots, plan.pages)
        want_view.slot_pages[rows] = plan.slot_pages
        counts = np.zeros(3, np.int64)
        page_ops.recall(got_view.slot_pages[rows], selected[rows], pool.data, got_view.all_kv,
                        0 if layers is None else layers.start, lay.sink, counts)
        assert np.array_equal(got_view.slot_pages, want_view.slot_pages)
        assert np.array_equal(got_view.all_kv, want_view.all_kv)  # bit for bit (fp16 widening is exact)
        assert counts.tolist() == [plan.selected, plan.hits, len(plan.pages)] and counts[2] > 0


def test_manager_recalls_in_c_unless_turned_off(monkeypatch):
    """`KVTRT_PAGE_OPS=0` takes the numpy path; both decode to the same views and counters."""
    rng = np.random.default_rng(2)
    L, Hkv, H, D, n = 2, 2, 4, 16, 300
    keys = [rng.standard_normal((1, Hkv, n, D)).astype(np.float32) for _ in range(L)]
    values = [rng.standard_normal((1, Hkv, n, D)).astype(np.float32) for _ in range(L)]
    query = [rng.standard_normal((1, H, D)).astype(np.float32) for _ in range(L)]
    out = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("KVTRT_PAGE_OPS", setting)
        config = parse_kv_spec("freekv:budget=64,page=8,sink=4,window=8,tau=0.9").retrieval
        r = FreeKVRetrieval(config, L, Hkv, H, D, threaded=False)
        r.start([k.copy() for k in keys], [v.copy() for v in values], query)
        step_rng = np.random.default_rng(3)
        for _ in range(12):
            r.prefetch()
            q = step_rng.standard_normal((L, 1, H, D)).astype(np.float32)
            kv = step_rng.standard_normal((2, L, 1, Hkv, 1, D)).astype(np.float32)
            r.finish_step(q, kv[0], kv[1])
        assert r._host_recall() == (setting == "1")
        out[setting] = (r.view().all_kv.copy(), r.view().slot_pages.copy(), r.stats().pages_recalled)
        r.close()
    assert np.array_equal(out["1"][0], out["0"][0]) and np.array_equal(out["1"][1], out["0"][1])
    assert out["1"][2] == out["0"][2] > 0


def test_recall_refuses_what_it_cannot_do():
    pool = np.zeros((1, 1, 4, 1, 2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="float16 view"):
        page_ops.recall(np.full((1, 1, 1, 2), -1), np.full((1, 1, 1, 2), -1), pool,
                        np.zeros((2, 1, 1, 1, 16, 8), np.float16), 0, 4, np.zeros(3, np.int64))


def _best_pages(q, kmin, kmax, smin, smax, n, top, span):
    """One query head's `top` best pages as the cover test finds them (numpy): Quest's bound of every span, the
    `top` best spans, then the `top` best of their pages (ties to the lower id)."""
    bound = lambda lo, hi: np.clip(q, 0, None) @ hi.T.astype(np.float32) + np.clip(q, None, 0) @ lo.T.astype(np.float32)
    spans = -(-n // span)
    best_spans = np.argsort(-bound(smin[:spans], smax[:spans]), kind="stable")[:top]
    pages = np.array(sorted(p for s in best_spans for p in range(s * span, min((s + 1) * span, n))))
    return pages[np.argsort(-bound(kmin[pages], kmax[pages]), kind="stable")[:top]]


def _cover_reference(query, kmin, kmax, smin, smax, n, held, top, span):
    """FreeKV's cover test in numpy: per KV head, whether some query head's `top` best pages are not all in
    `held`."""
    group = query.shape[0] // held.shape[0]
    return np.array([any(not set(_best_pages(q, kmin[h], kmax[h], smin[h], smax[h], n, top, span).tolist())
                         <= set(held[h].tolist()) for q in query[h * group:(h + 1) * group])
                     for h in range(held.shape[0])])


def _inline_view(kmin, kmax, smin, smax, slot_pages, n_pages, group, top, span):
    """An InlineView over one layer's summaries (what the cover test reads)."""
    kv_heads, k = slot_pages.shape[-2:]
    v = page_ops.InlineView()
    v.kmin, v.kmax, v.smin, v.smax, v.slot_pages = (a.ctypes.data for a in (kmin, kmax, smin, smax, slot_pages))
    v.layers, v.kv_heads, v.group, v.dim, v.k = 1, kv_heads, group, kmin.shape[-1], k
    v.cap, v.n_pages, v.cover, v.span, v.scap = kmin.shape[-2], n_pages, top, span, smin.shape[-2]
    return v


@pytest.mark.parametrize("n_pages,top,k", [(960, 4, 119), (953, 8, 119), (100, 1, 40)])
def test_cover_test_equals_numpy(n_pages, top, k):
    """The C cover test (the inline refresh's, run alone) against numpy on a quarter grid (exact bounds, many
    ties that go to the lower id): random held sets, a head holding exactly its query heads' best pages (kept),
    and the same head with one of them swapped out (corrected)."""
    rng = np.random.default_rng(2)
    kv_heads, group, dim, span = 3, 3, 64, P.SPAN_PAGES
    query = (np.round(rng.standard_normal((kv_heads * group, dim)) * 4) / 4).astype(np.float32)
    kmin = (np.round(rng.standard_normal((1, 1, kv_heads, 960, dim)) * 4) / 4).astype(np.float16)
    kmax = kmin + (np.round(np.abs(rng.standard_normal(kmin.shape)) * 4) / 4).astype(np.float16)
    spans = -(-960 // span)
    smin = np.stack([kmin[..., s * span:(s + 1) * span, :].min(-2) for s in range(spans)], -2)
    smax = np.stack([kmax[..., s * span:(s + 1) * span, :].max(-2) for s in range(spans)], -2)
    summaries = (kmin[0, 0], kmax[0, 0], smin[0, 0], smax[0, 0], n_pages)
    slot_pages = np.stack([rng.permutation(n_pages)[:k] for _ in range(kv_heads)])[None, None].astype(np.int64)
    if top == 1:  # head 0 holds its query heads' best pages
        best = sorted({int(_best_pages(q, kmin[0, 0, 0], kmax[0, 0, 0], smin[0, 0, 0], smax[0, 0, 0], n_pages, 1,
                                       span)[0]) for q in query[:group]})
        slot_pages[0, 0, 0] = best + [p for p in range(n_pages) if p not in best][:k - len(best)]
    view = _inline_view(kmin, kmax, smin, smax, slot_pages, n_pages, group, top, span)
    got = page_ops.cover_test(view, 0, query)
    want = _cover_reference(query, *summaries, slot_pages[0, 0], top, span)
    assert np.array_equal(got, want), (got, want)
    assert want.any()  # random held sets miss some best page
    if top == 1:
        assert not got[0]  # holds every query head's best page
        slot_pages[0, 0, 0, 0] = [p for p in range(n_pages) if p not in slot_pages[0, 0, 0]][0]  # drop one of them
        got = page_ops.cover_test(view, 0, query)
        assert got[0] and np.array_equal(got, _cover_reference(query, *summaries, slot_pages[0, 0], top, span))
