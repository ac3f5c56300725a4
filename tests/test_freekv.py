"""FreeKV / Quest retrieval manager (kvtrt.runtime.kv.pages + kvtrt.runtime.kv.freekv) on both array
backends (kvtrt.runtime.kv.backend): numpy, the CPU default, and torch (the GPU code path, run on the
CPU). The ``backend`` fixture (conftest.py) runs each pool / selection / manager test on both; inputs
and ground truth are torch, outputs are compared as torch tensors through ``T`` (zero-copy)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from kvtrt.runtime.kv.freekv import FreeKVRetrieval
from kvtrt.runtime.kv.pages import PagePool, group_scores, outward_fp16, page_scores, select_pages, topk_pages
from kvtrt.runtime.kv.spec import KVSpecError, parse_kv_spec, parse_stage

torch.set_num_threads(1)

#: an output of either backend as a torch tensor for comparison: zero-copy for a numpy array, the
#: tensor itself for a torch one
T = torch.as_tensor


# ----------------------------------------------------------------------------- helpers


class Seq:
    """Ground truth for a simulated decode: every token's K/V per layer, plus per-step queries.

    ``values[..., 0]`` holds the token id so a view slot can be traced back to its token.
    """

    def __init__(self, L=2, B=1, Hkv=2, G=2, D=16, total=300, seed=0, drift=None):
        g = torch.Generator().manual_seed(seed)
        self.L, self.B, self.Hkv, self.H, self.D = L, B, Hkv, Hkv * G, D
        self.keys = [torch.randn(B, Hkv, total, D, generator=g) for _ in range(L)]
        self.values = [torch.randn(B, Hkv, total, D, generator=g) for _ in range(L)]
        ids = torch.arange(total, dtype=torch.float32)
        for v in self.values:
            v[..., 0] = ids
        # queries q[t] for t = 0..total-1; with `drift` they form a slow random walk (high cosine)
        qs = []
        for _ in range(L):
            if drift is None:
                q = torch.randn(total, B, self.H, D, generator=g)
            else:
                steps = torch.randn(total, B, self.H, D, generator=g) * drift
                q = torch.randn(1, B, self.H, D, generator=g) + steps.cumsum(0)
            qs.append(q)
        self.queries = qs  # per layer [total, B, H, D]

    def q(self, t):
        return [q[t] for q in self.queries]

    def kv(self, lo, hi):
        return [k[:, :, lo:hi] for k in self.keys], [v[:, :, lo:hi] for v in self.values]


def attend(q, k, v, mask):
    """Masked GQA attention ``q`` [B,H,D] over ``k``/``v`` [B,Hkv,P,D] -> [B,H,D] (float64)."""
    q, k, v, mask = T(q), T(k), T(v), T(mask)
    b, h, d = q.shape
    g = h // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    logits = torch.einsum("bhd,bhpd->bhp", q.double(), kk) / math.sqrt(d)
    logits = logits.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    return torch.einsum("bhp,bhpd->bhd", torch.softmax(logits, -1), vv)


def token_ids(view, layer, b, h):
    live = T(view.mask[b]).bool()
    return T(view.values[layer])[b, h, live, 0].round().long()


def check_view(r: FreeKVRetrieval, view, seq: Seq, lengths, offsets=None):
    """Every live slot holds the right token once; sink + recent window present; pages whole."""
    lay = r.layout
    S, W, page = lay.sink, lay.window, lay.page
    # the view is the manager's backend's arrays (numpy or torch): both code paths really run
    assert all(r.xp.is_array(t) for t in (view.keys[0], view.values[0], view.mask, view.slot_pages))
    for b in range(seq.B):
        n = lengths[b]
        off = 0 if offsets is None else offsets[b]
        live = T(view.mask[b]).bool()
        for layer in range(seq.L):
            keys, values = T(view.keys[layer]), T(view.values[layer])
            smap = T(view.slot_pages[layer][b])
            page_live = live[S : lay.ring_start].view(lay.k_pages, page)
            for h in range(seq.Hkv):
                ids = values[b, h, live, 0].round().long()
                assert ids.unique().numel() == ids.numel(), "a token is attended twice"
                assert int(ids.min()) >= off and int(ids.max()) < off + n
                # contents match the ground truth
                torch.testing.assert_close(keys[b, h, live], seq.keys[layer][b, h, ids])
                torch.testing.assert_close(values[b, h, live], seq.values[layer][b, h, ids])
                got = set((ids - off).tolist())
                assert set(range(min(S, n))) <= got, "sink missing"
                assert set(range(max(S, n - W), n)) <= got, "recent window missing"
                # page slots: live exactly where a page is mapped, holding that whole page
                assert torch.equal(page_live.all(-1), smap[h] >= 0)
                for j, p in enumerate(smap[h].tolist()):
                    if p >= 0:
                        sl = slice(S + j * page, S + (j + 1) * page)
                        want = torch.arange(S + p * page, S + (p + 1) * page) + off
                        assert torch.equal(values[b, h, sl, 0].round().long(), want)


def decode(r, seq: Seq, n0, steps, on_step=None, prefetch=True):
    """Prefill ``n0`` tokens then run ``steps`` simulated decode steps; returns final length."""
    k, v = seq.kv(0, n0)
    r.start(k, v, seq.q(n0 - 1))
    n = n0
    for _ in range(steps):
        view = r.view()
        if prefetch:
            r.prefetch()
        q = seq.q(n)
        nk, nv = seq.kv(n, n + 1)
        if on_step is not None:
            on_step(view, n, q)
        r.finish_step(q, nk, nv)
        n += 1
    return n


def lockstep(managers, seq: Seq, n: int, steps: int):
    """Run the same simulated decode steps on several managers side by side, from length ``n``;
    yields the length after each step."""
    for _ in range(steps):
        for r in managers:
            r.prefetch()
            nk, nv = seq.kv(n, n + 1)
            r.finish_step(seq.q(n), nk, nv)
        n += 1
        yield n


def retrieval(spec):
    """The spec's retrieval stage, with an exact fp32 pool unless the spec names one: these tests
    compare views with the true K/V exactly (the pool's precisions: test_freekv_pool_dtype.py)."""
    if "pool_dtype" not in spec:
        spec += ",pool_dtype=fp32" if ":" in spec.split("+")[-1] else ":pool_dtype=fp32"
    return parse_kv_spec(spec).retrieval


def make(spec, seq: Seq, backend, **kw):
    """The manager of ``spec`` for ``seq`` on ``backend`` (``None``: the one ``device`` picks)."""
    r = retrieval(spec).create(n_layers=seq.L, n_kv_heads=seq.Hkv, n_heads=seq.H, head_dim=seq.D, batch=seq.B,
                               backend=backend, **kw)
    assert backend is None or (r.xp is backend and r.pool.xp is backend)
    return r


# ----------------------------------------------------------------------------- pages


def test_page_scores_match_bruteforce(backend):
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, D, P = 2, 3, 2, 8, 5
    q = torch.randn(B, Hkv * G, D, generator=g)
    a, c = torch.randn(B, Hkv, P, D, generator=g), torch.randn(B, Hkv, P, D, generator=g)
    kmin, kmax = torch.minimum(a, c), torch.maximum(a, c)
    xp = backend
    got = page_scores(xp.asarray(q), xp.asarray(kmin), xp.asarray(kmax))
    assert xp.is_array(got)
    ref = torch.zeros(B, Hkv * G, P)
    for b in range(B):
        for h in range(Hkv * G):
            for p in range(P):
                kh = h // G
                ref[b, h, p] = torch.maximum(q[b, h] * kmax[b, kh, p], q[b, h] * kmin[b, kh, p]).sum()
    torch.testing.assert_close(T(got), ref, rtol=1e-5, atol=1e-5)

    valid = torch.tensor([[True] * P, [True, True, True, False, False]])
    sm = group_scores(got, Hkv, "softmax", xp.asarray(valid), scale=0.5)
    mean = group_scores(got, Hkv, "mean", xp.asarray(valid))
    assert xp.is_array(sm) and xp.is_array(mean)
    sm, mean = T(sm), T(mean)
    for b in range(B):
        nv = int(valid[b].sum())
        for kh in range(Hkv):
            heads = ref[b, kh * G : (kh + 1) * G, :nv]
            torch.testing.assert_close(sm[b, kh, :nv], torch.softmax(heads * 0.5, -1).mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mean[b, kh, :nv], heads.mean(0), rtol=1e-5, atol=1e-5)
            assert torch.isneginf(sm[b, kh, nv:]).all() and torch.isneginf(mean[b, kh, nv:]).all()


def test_pool_summaries_and_layout(backend):
    g = torch.Generator().manual_seed(2)
    L, Hkv, D, page = 2, 2, 4, 4
    pool = PagePool(n_layers=L, batch=2, n_kv_heads=Hkv, head_dim=D, page=page, capacity=1, backend=backend)
    ks = [torch.randn(Hkv, 5 * page, D, generator=g) for _ in range(L)]
    vs = [torch.randn(Hkv, 5 * page, D, generator=g) for _ in range(L)]
    assert list(pool.append(1, [k[:, :2 * page] for k in ks], [v[:, :2 * page] for v in vs])) == [0, 1]
    assert list(pool.append(1, [k[:, 2 * page:] for k in ks], [v[:, 2 * page:] for v in vs])) == [2, 3, 4]
    assert pool.n_pages.tolist() == [0, 5] and pool.capacity >= 5
    for layer in range(L):
        for p in range(5):
            kp, vp = pool.page_kv(layer, 1, p)
            assert backend.is_array(kp) and backend.is_array(vp)
            kp, vp = T(kp), T(vp)
            torch.testing.assert_close(kp, ks[layer][:, p * page:(p + 1) * page])
            torch.testing.assert_close(vp, vs[layer][:, p * page:(p + 1) * page])
            lo, hi = outward_fp16(kp.amin(1), kp.amax(1))
            assert torch.equal(T(pool.kmin[layer][1, :, p]), lo) and torch.equal(T(pool.kmax[layer][1, :, p]), hi)
            assert T(pool.data[layer][1, p]).is_contiguous()  # one head's page K,V: [Hkv, 2, page, D]
    with pytest.raises(ValueError, match="whole number"):
        pool.append(0, [k[:, :3] for k in ks], [v[:, :3] for v in vs])


def test_host_summaries_are_float16_bounds_of_the_keys():
    """On the host the summaries are float16, kmin at or below every key of its page and channel and kmax at
    or above, each within one float16 step of the exact min / max (half the bytes a selection reads)."""
    g = torch.Generator().manual_seed(9)
    pool = PagePool(n_layers=1, batch=1, n_kv_heads=2, head_dim=16, page=8, capacity=4)
    keys = torch.randn(2, 4 * 8, 16, generator=g) * 3
    pool.append(0, [keys], [keys])
    assert pool.kmin.dtype == np.float16 and pool.kmax.dtype == np.float16
    pages = keys.reshape(2, 4, 8, 16)
    lo, hi = T(pool.kmin[0, 0, :, :4].astype(np.float32)), T(pool.kmax[0, 0, :, :4].astype(np.float32))
    assert bool((lo <= pages.amin(2)).all()) and bool((hi >= pages.amax(2)).all())
    step = torch.finfo(torch.float16).eps * pages.abs().amax(2)  # a float16 step at that magnitude, at most
    assert bool((pages.amin(2) - lo <= step).all()) and bool((hi - pages.amax(2) <= step).all())
    assert bool((lo < pages.amin(2)).any())  # rounding happened (outward), not a float32 copy


def test_span_summaries_bound_their_pages_as_pages_arrive_and_the_pool_grows(backend):
    """`smin`/`smax` of each span of `span` pages are the min / max of its pages' summaries (exactly, float16),
    kept up to date as pages arrive one at a time, a few at once, straddling spans, and across pool growth."""
    g = torch.Generator().manual_seed(11)
    pool = PagePool(n_layers=2, batch=1, n_kv_heads=2, head_dim=4, page=2, capacity=2, backend=backend)
    span, xp = pool.span, pool.xp
    written = 0
    for n_new in (1, 1, 3, span, 2 * span + 5, 1):
        keys = [torch.randn(2, n_new * 2, 4, generator=g) for _ in range(2)]
        pool.append(0, keys, keys)
        written += n_new
        for layer in range(2):
            for s in range(-(-written // span)):
                pages = slice(s * span, min(written, (s + 1) * span))
                lo, hi = xp.amin(pool.kmin[layer, 0, :, pages], -2), xp.amax(pool.kmax[layer, 0, :, pages], -2)
                assert np.array_equal(np.asarray(pool.smin[layer, 0, :, s]), np.asarray(lo))
                assert np.array_equal(np.asarray(pool.smax[layer, 0, :, s]), np.asarray(hi))
    assert pool.capacity >= written > 2 * span and pool.smin.shape[-2] == -(-pool.capacity // span)


def test_pool_growth_moves_written_pages_and_summaries_ahead_of_n_pages(backend):
    """Growing the pool copies what was written (pages appended, and summaries a prefill stored
    before `start` appends the pages), and only that: memory past it is left untouched."""
    g = torch.Generator().manual_seed(5)
    L, Hkv, D, page = 2, 2, 4, 4
    pool = PagePool(n_layers=L, batch=1, n_kv_heads=Hkv, head_dim=D, page=page, capacity=2, backend=backend)
    ks = [torch.randn(Hkv, 2 * page, D, generator=g) for _ in range(L)]
    for layer in range(L):
        pool.summarize_pages(layer, 0, 0, ks[layer])  # as `absorb` during a prefill: n_pages stays 0
    pool.reset()                                       # as `start` does before appending
    pool.reserve(64)
    assert pool.capacity >= 64 and pool.n_pages.tolist() == [0]
    for layer in range(L):
        pages = ks[layer].reshape(Hkv, 2, page, D)
        lo, hi = outward_fp16(pages.amin(2), pages.amax(2))
        assert torch.equal(T(pool.kmin[layer, 0, :, :2]), lo) and torch.equal(T(pool.kmax[layer, 0, :, :2]), hi)

@pytest.mark.parametrize("combine", ["softmax", "mean"])
def test_topk_per_kv_head(combine, backend):
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, P, k = 3, 2, 3, 8, 9, 4
    q = torch.randn(B, Hkv * G, D, generator=g)
    a, c = torch.randn(B, Hkv, P, D, generator=g), torch.randn(B, Hkv, P, D, generator=g)
    kmin, kmax = torch.minimum(a, c), torch.maximum(a, c)
    n_pages = torch.tensor([9, 2, 0])
    xp = backend
    sel = select_pages(xp.asarray(q), xp.asarray(kmin), xp.asarray(kmax), xp.asarray(n_pages), k, combine)
    assert xp.is_array(sel) and tuple(sel.shape) == (B, Hkv, k)
    for b in range(B):
        n = int(n_pages[b])
        for kh in range(Hkv):
            per_head = torch.stack([
                torch.stack([torch.maximum(q[b, h] * kmax[b, kh, p], q[b, h] * kmin[b, kh, p]).sum()
                             for p in range(n)]) if n else torch.zeros(0)
                for h in range(kh * G, (kh + 1) * G)])
            if combine == "softmax":
                score = torch.softmax(per_head / math.sqrt(D), -1).mean(0) if n else per_head.mean(0)
            else:
                score = per_head.mean(0)
            want = score.argsort(descending=True)[:k].tolist() if n else []
            want += [-1] * (k - len(want))
            assert sel[b, kh].tolist() == want
    # -inf scores are never selected
    s = xp.asarray(torch.tensor([[[1.0, float("-inf"), 0.5]]]))
    assert topk_pages(s, 4).tolist() == [[[0, 2, -1, -1]]]
    # ties (e.g. softmax probabilities underflowing to 0) go to the lowest page id, on both backends
    s = xp.asarray(torch.tensor([[[0.5, 0, 0, 0, 0, 0, 0, 0, 0.2, 0, 0, 0]]]))
    assert topk_pages(s, 4).tolist() == [[[0, 8, 1, 2]]]


# ----------------------------------------------------------------------------- spec


def test_spec_defaults_and_layout():
    cfg = parse_stage("freekv:budget=1024")
    assert (cfg.page, cfg.sink, cfg.window, cfg.combine) == (8, 4, 64, "softmax")
    assert cfg.tau is None and cfg.cover is None  # resolved by the path: `correction`
    assert cfg.correction(inline=False) == (0.9, 0) and cfg.correction(inline=True) == (0.7, 4)
    assert cfg.k_pages() == (1024 - 4 - 64) // 8 == 119
    assert cfg.slots() == 4 + 119 * 8 + 64 + 8
    q = retrieval("quest:budget=512,page=16,sink=0,window=16")
    assert q.mode == "quest" and q.k_pages() == 31 and q.tau == 1.0
    assert retrieval("freekv").budget == 2048
    assert retrieval("snapkv:budget=0.5+freekv:budget=300,combine=mean").combine == "mean"
    frac = retrieval("freekv:budget=0.5,window=8,page=8")
    with pytest.raises(KVSpecError, match="max_context"):
        frac.k_pages()
    assert frac.k_pages(max_context=100) == (50 - 4 - 8) // 8
    assert cfg.min_context is None and not cfg.engages(2048) and cfg.engages(2049)  # default: 2 x budget
    low = retrieval("freekv:budget=1024,min_context=0")
    assert low.engages(1) and "min_context=0" in str(low)
    assert retrieval("quest:budget=1024,min_context=5000").engages(5001) is True
    for text in ("freekv:budget=0.5,window=8,page=8", "quest:budget=512,page=16,sink=0,window=16",
                 "freekv:tau=1,combine=mean,min_context=0", "kvcrush:budget=0.5+freekv:budget=300,tau=0.85"):
        spec = parse_kv_spec(text)
        assert str(spec) == text and parse_kv_spec(str(spec)) == spec  # rendered as written, parsed back


@pytest.mark.parametrize("spec, message", [
    ("freekv:budget=64", "raise budget to at least 76"),
    ("freekv:budget=2000,tau=1.5", "outside [0, 1]"),
    ("freekv:budget=2000,tau=-0.1", "outside [0, 1]"),
    ("freekv:budget=2000,tau=high", "not a number"),
    ("freekv:budget=2000,combine=max", "unknown combine 'max'"),
    ("freekv:budget=2000,combine=max", "use one of softmax, mean"),
    ("freekv:budget=2000,pages=16", "valid options: budget, page, sink, window, tau, combine"),
    ("quest:budget=2000,tau=0.5", "(an option of freekv)"),
    ("freekv:budget=abc", "not a number"),
    ("freekv:budget=2000,page=0", "page=0 must be at least 1"),
    ("freekv:budget=2000,sink=x", "not a whole number"),
    ("freekv:budget=2000,window=-1", "at least 0"),
    ("freekv:budget=2000,min_context=-5", "min_context=-5 must be at least 0"),
    ("quest:budget=2000,min_context=big", "not a whole number"),
    ("snapkv:budget=0.5", "not a retrieval policy"),
])
def test_bad_specs(spec, message):
    with pytest.raises(KVSpecError) as err:
        parse_stage(spec, kind="retrieval")
    assert message in str(err.value)


def test_compaction_stage_rejected():
    with pytest.raises(KVSpecError, match="not a retrieval policy"):
        parse_stage("h2o", kind="retrieval")


# ----------------------------------------------------------------------------- manager


SMALL = "page=8,sink=4,window=8"


def test_full_budget_view_holds_every_token_and_matches_full_attention(backend):
    seq = Seq(L=2, B=2, Hkv=2, G=2, D=16, total=200, seed=4)
    # prompts of different lengths via left padding; budget >= every context reached
    n0, steps = [90, 61], 40
    pad = n0[0] - n0[1]
    mask = torch.ones(2, n0[0], dtype=torch.bool)
    mask[1, :pad] = False
    r = make(f"freekv:budget=200,{SMALL},tau=0.9", seq, backend)
    # batch row 1 holds the same tokens shifted by `pad` (token ids in value[...,0] stay absolute)
    k, v = seq.kv(0, n0[0])
    r.start(k, v, seq.q(n0[0] - 1), mask=mask)
    lengths = list(n0)
    n = n0[0]
    for _ in range(steps):
        view = r.view()
        check_view(r, view, seq, lengths, offsets=[0, pad])
        for b in range(2):
            for layer in range(seq.L):
                for h in range(seq.Hkv):
                    assert token_ids(view, layer, b, h).numel() == lengths[b]  # every token
        q = seq.q(n)
        for layer in range(seq.L):
            full_mask = torch.ones(2, n, dtype=torch.bool)
            full_mask[1, :pad] = False
            ref = attend(q[layer], seq.keys[layer][:, :, :n], seq.values[layer][:, :, :n], full_mask)
            got = attend(q[layer], view.keys[layer], view.values[layer], view.mask)
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
        r.prefetch()
        nk, nv = seq.kv(n, n + 1)
        r.finish_step(q, nk, nv)
        n += 1
        lengths = [x + 1 for x in lengths]
    assert r.lengths == lengths
    assert r.pool.n_pages.tolist() == [(130 - 4 - 8) // 8, (101 - 4 - 8) // 8]
    r.close()


@pytest.mark.parametrize("combine", ["softmax", "mean"])
def test_tau_one_view_equals_fresh_selection(combine, backend):
    seq = Seq(L=2, B=2, Hkv=2, G=3, D=16, total=260, seed=5)
    r = make(f"freekv:budget=60,{SMALL},tau=1,combine={combine}", seq, backend)
    assert r.layout.k_pages == 6

    def on_step(view, n, q):
        check_view(r, view, seq, [n] * seq.B)

    n0 = 120
    k, v = seq.kv(0, n0)
    r.start(k, v, seq.q(n0 - 1))
    n = n0
    for _ in range(30):
        r.prefetch()
        q = seq.q(n)
        nk, nv = seq.kv(n, n + 1)
        view = r.finish_step(q, nk, nv)
        n += 1
        check_view(r, view, seq, [n] * seq.B)
        for layer in range(seq.L):
            fresh = r.fresh_selection(layer, q[layer], view)
            held = view.slot_pages[layer]
            for b in range(seq.B):
                for h in range(seq.Hkv):
                    assert set(held[b, h].tolist()) - {-1} == set(fresh[b, h].tolist()) - {-1}
    st = r.stats()
    assert st.correction_rate == 1.0 and st.steps == 30
    r.close()


@pytest.mark.parametrize("tau, rate", [(0.0, 0.0), (1.0, 1.0)])
def test_correction_rate_extremes(tau, rate, backend):
    seq = Seq(total=200, seed=6, drift=0.01)
    r = make(f"freekv:budget=44,{SMALL},tau={tau}", seq, backend)
    decode(r, seq, 100, 20)
    st = r.stats()
    assert st.heads_checked == 20 * seq.L * seq.B * seq.Hkv
    assert st.correction_rate == rate
    r.close()


def test_intermediate_tau_corrects_only_drifted_heads(backend):
    seq = Seq(total=200, seed=7, drift=0.02)  # slow random walk: cos(q_t, q_{t-1}) close to 1
    r = make(f"freekv:budget=44,{SMALL},tau=0.5", seq, backend)
    decode(r, seq, 100, 10)
    assert r.stats().correction_rate == 0.0
    seq2 = Seq(total=200, seed=7)  # independent queries each step: cos ~ 0 < 0.5
    r2 = make(f"freekv:budget=44,{SMALL},tau=0.5", seq2, backend)
    decode(r2, seq2, 100, 10, on_step=lambda view, n, q: check_view(r2, view, seq2, [n]))
    assert r2.stats().correction_rate > 0.7
    r.close()
    r2.close()


def test_double_buffer_never_serves_half_written_view(backend):
    seq = Seq(L=3, total=200, seed=8)
    r = make(f"freekv:budget=44,{SMALL},tau=0.9", seq, backend)
    gate, entered = threading.Event(), threading.Event()
    calls = []

    def slow_copy(n_pages):
        calls.append(threading.current_thread() is threading.main_thread())
        if not gate.is_set():
            entered.set()
            assert gate.wait(10)  # hold the worker mid-preparation (layer 0 written, layers 1-2 not)

    k, v = seq.kv(0, 100)
    r.start(k, v, seq.q(99))
    r.copy_hook = slow_copy
    r.copy_chunk = 1  # one page-copy op per layer, so the worker can be held after layer 0
    n = 100
    for step in range(6):
        served = r.view()
        snap = ([T(t).clone() for t in served.keys], [T(t).clone() for t in served.values], T(served.mask).clone())
        gate.clear()
        entered.clear()
        r.prefetch()
        assert entered.wait(10)  # the worker is now blocked half-way through the other buffer
        assert r.view() is served
        assert r.prefetching and not r.wait_prefetch(timeout=0)
        for t, s in zip(served.keys + served.values + [served.mask], snap[0] + snap[1] + [snap[2]]):
            assert torch.equal(T(t), s)  # the served buffer is untouched while the other is written
        check_view(r, served, seq, [n])
        q = seq.q(n)
        nk, nv = seq.kv(n, n + 1)
        threading.Timer(0.05, gate.set).start()  # release the worker while finish_step waits
        nxt = r.finish_step(q, nk, nv)
        n += 1
        assert nxt is not served and nxt is r.view()
        check_view(r, nxt, seq, [n])  # complete: every layer written, new token included
    assert calls and not any(calls[: seq.L])  # speculative copies ran on the worker
    assert r.stats().wait_s > 0.0
    r.close()


def test_incremental_recall_copies_exactly_the_missing_pages(backend):
    seq = Seq(L=2, B=2, Hkv=2, G=2, D=8, total=300, seed=9)
    r = make(f"freekv:budget=52,{SMALL},tau=1", seq, backend)  # k = 5
    k, v = seq.kv(0, 200)
    r.start(k, v, seq.q(199))
    copies = []
    r.copy_hook = lambda n: copies.append(n)

    def misses(before, after):
        count = 0
        for layer in range(seq.L):
            for b in range(seq.B):
                for h in range(seq.Hkv):
                    old_row, new_row = before[layer][b, h].tolist(), after[layer][b, h].tolist()
                    count += len(set(new_row) - set(old_row) - {-1})
                    for j, p in enumerate(old_row):  # resident pages never move
                        if p >= 0 and p in new_row:
                            assert new_row[j] == p
        return count

    n = 200
    total_copied = 0
    for step in range(12):
        other = r.views[1 - r.view().index]
        before = [T(m).clone() for m in other.slot_pages]
        copies.clear()
        r.prefetch()
        assert r.wait_prefetch()  # let the worker finish so its copies can be counted on their own
        mid = [T(m).clone() for m in other.slot_pages]
        assert sum(copies) == misses(before, mid)  # speculative recall: exactly the missing pages
        if step == 0:
            assert sum(copies) == seq.L * seq.B * seq.Hkv * r.layout.k_pages  # first fill of the second buffer
        copies.clear()
        q = seq.q(n)
        nk, nv = seq.kv(n, n + 1)
        view = r.finish_step(q, nk, nv)
        n += 1
        assert view is other
        assert sum(copies) == misses(mid, view.slot_pages)  # correction: exactly the missing pages
        total_copied += sum(copies)
        check_view(r, view, seq, [n, n])
    assert total_copied > 0  # independent queries: the corrections did have work to do
    r.close()


def test_recall_counts_copies_directly(backend):
    seq = Seq(L=1, B=1, Hkv=2, G=1, D=4, total=200, seed=10)
    r = make(f"freekv:budget=60,{SMALL},tau=0", seq, backend)  # k = 6
    k, v = seq.kv(0, 150)
    r.start(k, v, seq.q(149))
    copies = []
    r.copy_hook = lambda n: copies.append(n)
    buf = r.views[1]
    buf.n_pages = r.pool.n_pages.tolist()
    T(buf.slot_pages[0]).copy_(torch.tensor([[[3, -1, 7, 1, -1, 9], [0, 1, 2, 3, 4, 5]]]))  # in place
    sel = torch.tensor([[[7, 3, 10, 11, 12, -1], [5, 4, 3, 2, 1, 0]]])
    r.recall(buf, backend.asarray(sel[None]))
    assert copies == [3]  # head 0 lacks 10, 11, 12; head 1 holds all its pages
    m = T(buf.slot_pages[0][0])
    assert m[0, 0] == 3 and m[0, 2] == 7  # kept in place
    assert sorted(m[0].tolist()) == [-1, 3, 7, 10, 11, 12] and m[0, 1] >= 10 and m[0, 4] >= 10
    assert m[1].tolist() == [0, 1, 2, 3, 4, 5]
    for j, p in enumerate(m[0].tolist()):
        if p >= 10:  # the copied pages hold their data (3 and 7 were only claimed in the map)
            torch.testing.assert_close(T(buf.keys[0][0, 0, 4 + 8 * j: 4 + 8 * (j + 1)]),
                                       T(r.pool.page_kv(0, 0, p)[0][0]))
    st = r.stats()
    assert (st.pages_selected, st.pages_hit, st.pages_recalled) == (11, 8, 3)


def test_stationary_query_stops_recalling(backend):
    seq = Seq(L=2, total=260, seed=11, drift=0.0)  # the same query every step
    r = make(f"freekv:budget=52,{SMALL},tau=0.9", seq, backend)
    copies = []
    n = decode(r, seq, 200, 3)
    r.copy_hook = lambda n_pages: copies.append(n_pages)
    decode_more = 6
    for _ in range(decode_more):
        r.prefetch()
        nk, nv = seq.kv(n, n + 1)
        r.finish_step(seq.q(n), nk, nv)
        n += 1
    # no corrections; both buffers converged to the same pages, except that a page spilled
    # from the window becomes selectable (a step spills every `page` tokens)
    st = r.stats()
    assert st.correction_rate == 0.0
    assert sum(copies) <= 2 * seq.L * seq.Hkv
    assert st.page_hit_rate > 0.5
    r.close()


def test_views_are_stable_buffers_and_threaded_matches_inline(backend):
    seq = Seq(L=2, B=2, total=220, seed=12, drift=0.3)
    a = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend)
    b = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend, threaded=False)
    ptrs = [(T(t).data_ptr() for t in v.keys + v.values + [v.mask]) for v in a.views]
    ptrs = [tuple(p) for p in ptrs]
    ka, va = seq.kv(0, 120)
    a.start(ka, va, seq.q(119))
    b.start(ka, va, seq.q(119))
    for _ in lockstep((a, b), seq, 120, 20):
        va_, vb_ = a.view(), b.view()
        assert va_.index == vb_.index
        for x, y in zip(va_.keys + va_.values + [va_.mask], vb_.keys + vb_.values + [vb_.mask]):
            assert torch.equal(T(x), T(y))
    assert [tuple(T(t).data_ptr() for t in v.keys + v.values + [v.mask]) for v in a.views] == ptrs
    assert a.stats().heads_corrected == b.stats().heads_corrected
    a.close()
    b.close()


def test_staging_slot_leaves_the_view_unchanged(backend):
    """With a staging slot (the in-place decode graph writes each step's K/V there), every view
    holds exactly what a view without one holds, plus one always-live slot at the end that the
    retrieval never writes; page copies land in the same slots."""
    seq = Seq(L=2, B=2, total=220, seed=13, drift=0.3)
    plain = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend)
    staged = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend, staging_slot=True)
    ka, va = seq.kv(0, 120)
    plain.start(ka, va, seq.q(119))
    staged.start(ka, va, seq.q(119))
    for v in staged.views:
        for t in v.keys + v.values:
            t[:, :, -1] = 7.0  # what the graph would have written; retrieval must not touch it
    for _ in lockstep((plain, staged), seq, 120, 20):
        a, b = plain.view(), staged.view()
        assert b.keys[0].shape[2] == a.keys[0].shape[2] + 1 == staged.slots + 1
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            assert torch.equal(T(x), T(y[:, :, :-1])) and bool((T(y[:, :, -1]) == 7.0).all())
        assert torch.equal(T(a.mask), T(b.mask[:, :-1])) and bool(T(b.mask[:, -1]).all())
    plain.close()
    staged.close()


def test_needle_page_is_retrieved(backend):
    """A page whose keys align with the query is selected and attention over the view is close to full."""
    seq = Seq(L=1, B=1, Hkv=1, G=2, D=16, total=400, seed=13)
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    needle = slice(4 + 10 * 8, 4 + 11 * 8)  # page 10
    seq.keys[0][0, 0, needle] = direction * 3 + 0.1 * torch.randn(8, 16)
    for t in range(400):
        seq.queries[0][t, 0] = direction * 2 + 0.3 * torch.randn(2, 16)
    r = make(f"freekv:budget=44,{SMALL},tau=0.9", seq, backend)  # 4 pages out of ~36
    seen = []

    def on_step(view, n, q):
        seen.append(10 in view.slot_pages[0][0, 0].tolist())
        full = attend(q[0], seq.keys[0][:, :, :n], seq.values[0][:, :, :n], torch.ones(1, n, dtype=torch.bool))
        got = attend(q[0], view.keys[0], view.values[0], view.mask)
        stream_mask = T(view.mask).clone()
        stream_mask[:, 4 : r.layout.ring_start] = False  # sink + window only
        base = attend(q[0], view.keys[0], view.values[0], stream_mask)
        assert (got - full).abs().mean() < 0.5 * (base - full).abs().mean()

    decode(r, seq, 300, 10, on_step=on_step)
    assert all(seen)
    r.close()


def test_quest_mode_select_current_query(backend):
    seq = Seq(L=2, B=2, total=260, seed=14)
    r = make(f"quest:budget=52,{SMALL}", seq, backend)
    k, v = seq.kv(0, 150)
    r.start(k, v, seq.q(149))
    n = 150
    for _ in range(12):
        view = r.view()
        r.prefetch()  # no-op in quest mode
        assert not r.prefetching
        probe = seq.q(n)
        assert r.select(probe) is view  # re-selected in place with the current query
        for layer in range(seq.L):
            fresh = r.fresh_selection(layer, probe[layer])
            for b in range(seq.B):
                for h in range(seq.Hkv):
                    assert set(view.slot_pages[layer][b, h].tolist()) - {-1} == set(fresh[b, h].tolist()) - {-1}
        check_view(r, view, seq, [n, n])
        nk, nv = seq.kv(n, n + 1)
        nxt = r.finish_step(probe, nk, nv)
        n += 1
        check_view(r, nxt, seq, [n, n])
    assert r.stats().heads_checked == 0
    r.close()


def test_short_prompt_inside_sink_and_errors(backend):
    seq = Seq(L=1, total=120, seed=15)
    r = make(f"freekv:budget=44,{SMALL}", seq, backend)
    with pytest.raises(RuntimeError, match="start"):
        r.prefetch()
    n = decode(r, seq, 2, 60, on_step=lambda view, n, q: check_view(r, view, seq, [n]))
    check_view(r, r.view(), seq, [n])
    assert r.pool.n_pages.tolist() == [(62 - 4 - 8) // 8]
    r.prefetch()
    with pytest.raises(RuntimeError, match="twice"):
        r.prefetch()
    with pytest.raises(RuntimeError, match="in flight"):
        r.select(seq.q(n))
    r.close()


def test_stats_keys(backend):
    seq = Seq(total=150, seed=16)
    r = make(f"freekv:budget=44,{SMALL}", seq, backend)
    decode(r, seq, 100, 5)
    st = r.stats()
    for key in ("correction_rate", "page_hit_rate", "recalled_bytes_per_step", "wait_s", "wait_s_per_step",
                "pages_recalled", "steps", "correction_s"):
        assert key in st.as_dict()
    assert st.recalled_bytes == st.pages_recalled * 2 * 8 * seq.D * 4
    r.close()


def test_pool_sized_once_for_prompt_plus_reserved_tokens(backend):
    """``start(reserve_tokens=n)`` sizes the pool exactly (no doubling overshoot) and decoding
    those ``n`` tokens never reallocates it; stored and view bytes add up to ``nbytes``."""
    seq = Seq(total=400, seed=17)
    r = make(f"freekv:budget=44,{SMALL}", seq, backend)
    k, v = seq.kv(0, 300)
    r.start(k, v, seq.q(299), reserve_tokens=60)
    sink, window, page = r.layout.sink, r.layout.window, r.layout.page
    assert r.pool.capacity == -(-(360 - sink - window) // page)
    data = r.pool.data
    for n in range(300, 360):
        r.prefetch()
        r.finish_step(seq.q(n), *seq.kv(n, n + 1))
    assert r.pool.data is data
    st = r.stats()
    itemsize = 4
    summary = np.dtype(r.pool.summary_dtype).itemsize  # float16
    pool = seq.L * seq.B * r.pool.capacity * seq.Hkv * (2 * page * seq.D * itemsize + 2 * seq.D * summary)
    pool += seq.L * seq.B * seq.Hkv * -(-r.pool.capacity // r.pool.span) * 2 * seq.D * summary  # span summaries
    master = 2 * seq.L * seq.B * seq.Hkv * (sink + window + page) * seq.D * itemsize
    assert st.stored_bytes == pool + master
    assert st.view_bytes == 2 * 2 * seq.L * seq.B * seq.Hkv * r.slots * seq.D * itemsize
    assert r.nbytes == st.stored_bytes + st.view_bytes
    r.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_path_matches_cpu(backend):
    """The CUDA code path (torch on the GPU) builds exactly the views of each CPU backend."""
    seq = Seq(L=2, B=2, total=220, seed=17, drift=0.3)
    cpu = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend)
    gpu = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, None, device="cuda")
    k, v = seq.kv(0, 120)
    cpu.start(k, v, seq.q(119))
    gpu.start([t.cuda() for t in k], [t.cuda() for t in v], [t.cuda() for t in seq.q(119)])
    n = 120
    for _ in range(20):
        nk, nv = seq.kv(n, n + 1)
        cpu.prefetch()
        cpu.finish_step(seq.q(n), nk, nv)
        gpu.prefetch()
        gpu.finish_step([t.cuda() for t in seq.q(n)], [t.cuda() for t in nk], [t.cuda() for t in nv])
        n += 1
        for x, y in zip(cpu.view().keys + [cpu.view().mask], gpu.view().keys + [gpu.view().mask]):
            assert gpu.xp.is_cuda and y.is_cuda
            assert torch.equal(T(x), y.cpu())
    cpu.close()
    gpu.close()


# ----------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page=st.integers(1, 6),
    sink=st.integers(0, 5),
    window=st.integers(0, 10),
    extra_pages=st.integers(0, 6),
    n0=st.integers(1, 70),
    steps=st.integers(1, 25),
    tau=st.sampled_from([0.0, 0.5, 1.0]),
    batch=st.integers(1, 2),
    combine=st.sampled_from(["softmax", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_property_views_consistent(page, sink, window, extra_pages, n0, steps, tau, batch, combine, seed, backend):
    seq = Seq(L=2, B=batch, Hkv=2, G=2, D=8, total=n0 + steps + 1, seed=seed, drift=0.5)
    budget = sink + window + page + extra_pages * page
    r = make(f"freekv:budget={budget},page={page},sink={sink},window={window},tau={tau},combine={combine}", seq,
             backend)
    full = budget >= n0 + steps

    def on_step(view, n, q):
        check_view(r, view, seq, [n] * batch)
        if full:
            for layer in range(seq.L):
                assert token_ids(view, layer, 0, 0).numel() == n
                ref = attend(q[layer], seq.keys[layer][:, :, :n], seq.values[layer][:, :, :n],
                             torch.ones(batch, n, dtype=torch.bool))
                got = attend(q[layer], view.keys[layer], view.values[layer], view.mask)
                torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)

    n = decode(r, seq, n0, steps, on_step=on_step)
    check_view(r, r.view(), seq, [n] * batch)
    live = T(r.view().mask).sum(-1)
    assert (live <= budget + page).all()  # the ring holds up to window + page tokens
    r.close()


def test_start_release_hands_each_layer_over_and_changes_nothing(backend):
    """`start(release=True)` empties the caller's per-layer lists (the prompt's KV is never held
    twice) and builds exactly the views and pool that `release=False` builds, also with a mask."""
    seq = Seq(L=3, B=2, total=180, seed=21)
    k, v = seq.kv(0, 150)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :7] = 0  # left padding of the shorter sequence
    mask[0, 40] = 0  # a dead slot inside
    kept = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend, threaded=False)
    handed = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend, threaded=False)
    kept.start(list(k), list(v), seq.q(149), mask=mask)
    keys, values = list(k), list(v)
    handed.start(keys, values, seq.q(149), mask=mask, release=True)
    assert keys == [None] * seq.L and values == [None] * seq.L
    assert all(t is not None for t in k)  # only the lists handed over were emptied
    assert kept.lengths == handed.lengths == [149, 143]
    a, b = kept.view(), handed.view()
    for name in ("all_keys", "all_values", "mask", "slot_pages"):
        assert torch.equal(T(getattr(a, name)), T(getattr(b, name))), name
    assert torch.equal(T(kept.pool.n_pages), T(handed.pool.n_pages))
    for s, n in enumerate(kept.pool.n_pages.tolist()):  # written pages only (the rest is never read)
        assert torch.equal(T(kept.pool.data[:, s, :n]), T(handed.pool.data[:, s, :n]))
        assert torch.equal(T(kept.pool.kmin[:, s, :, :n]), T(handed.pool.kmin[:, s, :, :n]))
        assert torch.equal(T(kept.pool.kmax[:, s, :, :n]), T(handed.pool.kmax[:, s, :, :n]))


@pytest.mark.parametrize("pool_dtype", ["fp32", "int8"])
def test_pool_built_during_prefill_equals_pool_built_after(pool_dtype, backend):
    """`begin` + `absorb` after each prefill chunk (summaries of the completed pages, built as the
    chunks are written) then `start` gives exactly the pool, views and decode of `start` alone; the
    stats say how many pages were summarized during the prefill."""
    seq = Seq(L=3, B=1, total=260, seed=5)
    n = 203
    spec = f"freekv:budget=44,{SMALL},tau=0.8,pool_dtype={pool_dtype}"
    after = make(spec, seq, backend, threaded=False)
    during = make(spec, seq, backend, threaded=False)
    k, v = seq.kv(0, n)
    after.start(list(k), list(v), seq.q(n - 1), mask=torch.ones(1, n, dtype=torch.long), reserve_tokens=40)
    during.begin(n, reserve_tokens=40)
    done = [during.absorb(k, end) for end in (50, 64, 150, n)]  # chunk ends, as the prefill writes them
    lay = during.layout
    assert done == [(50 - 4) // 8, (64 - 4) // 8, (150 - 4) // 8, lay.pages_at_start(n)]
    # before start() the summaries exist, the page data does not (one copy, made by start)
    for layer in range(seq.L):
        keys = k[layer][0, :, 4:4 + 8 * done[-1]].reshape(seq.Hkv, done[-1], 8, seq.D)
        lo, _ = outward_fp16(keys.amin(-2), keys.amax(-2))
        assert torch.equal(T(during.pool.kmin[layer, 0, :, :done[-1]]), lo)
    during.start(list(k), list(v), seq.q(n - 1), mask=torch.ones(1, n, dtype=torch.long), reserve_tokens=40)
    assert during.stats().pages_summarized_in_prefill == done[-1]
    assert after.stats().pages_summarized_in_prefill == 0
    pages = int(after.pool.n_pages[0])
    assert pages == done[-1] == int(during.pool.n_pages[0])
    for name in ("data", "kmin", "kmax", "vq"):
        a, b = getattr(after.pool, name), getattr(during.pool, name)
        if a is None:
            continue
        cut = (slice(None), 0, slice(None), slice(0, pages)) if name.startswith("k") else (slice(None), 0,
                                                                                           slice(0, pages))
        assert torch.equal(T(a[cut]), T(b[cut])), name
    for name in ("all_keys", "all_values", "mask", "slot_pages"):
        assert torch.equal(T(getattr(after.view(), name)), T(getattr(during.view(), name))), name
    decode(after, seq, n, 30)
    decode(during, seq, n, 30)
    for name in ("all_keys", "all_values", "mask", "slot_pages"):
        assert torch.equal(T(getattr(after.view(), name)), T(getattr(during.view(), name))), name


def test_absorb_needs_begin_and_prompt_mismatch_ignores_summaries(backend):
    seq = Seq(L=2, B=1, total=120, seed=6)
    r = make(f"freekv:budget=44,{SMALL}", seq, backend, threaded=False)
    with pytest.raises(RuntimeError, match="begin"):
        r.absorb(seq.keys, 50)
    r.begin(100)
    r.absorb(seq.keys, 100)
    k, v = seq.kv(0, 110)  # not the announced prompt: the summaries are rebuilt from the data
    r.start(list(k), list(v), seq.q(109))
    assert r.stats().pages_summarized_in_prefill == 0
    ref = make(f"freekv:budget=44,{SMALL}", seq, backend, threaded=False)
    ref.start(list(k), list(v), seq.q(109))
    p = int(ref.pool.n_pages[0])
    assert torch.equal(T(r.pool.kmin[:, 0, :, :p]), T(ref.pool.kmin[:, 0, :, :p]))


@pytest.mark.parametrize("combine,drift", [("softmax", "mean"), ("mean", "mean"), ("softmax", "min")])
def test_corrected_heads_select_what_a_fresh_selection_picks(combine, drift, backend):
    """At an intermediate tau, after each step: every head whose query heads' cosines to the
    speculative query (their mean, or with drift=min the least) fall below tau holds exactly a fresh
    top-k with the current query; every other head holds the speculative selection (made with the
    query the prefetch used)."""
    seq = Seq(L=2, B=2, Hkv=2, G=3, D=16, total=260, seed=9)
    g = torch.Generator().manual_seed(10)
    # per query head: KV head 1 drifts; with drift=min one query head of KV head 0 drifts alone, which
    # its group mean would not catch
    noise = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1, 0.1] if drift == "min" else [0.1, 0.1, 0.1, 0.6, 0.6, 0.6])
    noise = noise[None, None, :, None]
    for layer in range(seq.L):  # a fixed query per head plus per-step noise
        base = torch.randn(1, seq.B, seq.H, seq.D, generator=g)
        seq.queries[layer] = base + noise * torch.randn(260, seq.B, seq.H, seq.D, generator=g)
    tau = 0.9
    r = make(f"freekv:budget=60,{SMALL},tau={tau},combine={combine},drift={drift}", seq, backend, threaded=False)
    n = 120
    k, v = seq.kv(0, n)
    r.start(k, v, seq.q(n - 1))
    corrected = kept = 0
    for _ in range(25):
        speculative = T(r._latest_query).clone()  # what prefetch() selects with
        r.prefetch()
        target = r._views[1 - r._current]
        q = seq.q(n)
        nk, nv = seq.kv(n, n + 1)
        view = r.finish_step(q, nk, nv)
        assert view is target
        n += 1
        qs = torch.stack(q)
        cos = torch.nn.functional.cosine_similarity(qs, speculative, dim=-1)  # [L, B, H]
        grouped = cos.reshape(seq.L, seq.B, seq.Hkv, -1)
        drifted = (grouped.mean(-1) if drift == "mean" else grouped.amin(-1)) < tau
        for layer in range(seq.L):
            fresh = r.fresh_selection(layer, qs[layer], view)
            spec = r.fresh_selection(layer, speculative[layer], view)
            for b in range(seq.B):
                for h in range(seq.Hkv):
                    want = fresh if drifted[layer, b, h] else spec
                    assert set(view.slot_pages[layer, b, h].tolist()) - {-1} == set(want[b, h].tolist()) - {-1}
                    corrected += int(drifted[layer, b, h])
                    kept += int(not drifted[layer, b, h])
    assert corrected > 0 and kept > 0  # both branches exercised
    assert r.stats().heads_corrected == corrected
    r.close()


@pytest.mark.parametrize("threaded", [False, True])
def test_prefetch_reuses_the_corrections_selection_when_the_pool_is_unchanged(threaded, backend):
    """The next prefetch selects with the query the last correction selected with; when the pool
    snapshot is the same it takes that selection instead of computing it again. Views and stats are
    exactly those of a manager that always selects (pages spill every 8 steps here, so both paths run)."""
    seq = Seq(L=2, B=2, Hkv=2, G=3, D=16, total=300, seed=12)  # independent queries: most heads drift
    reusing = make(f"freekv:budget=60,{SMALL},tau=0.9", seq, backend, threaded=threaded)
    always = make(f"freekv:budget=60,{SMALL},tau=0.9", seq, backend, threaded=threaded)
    always._take_selection = lambda: None
    n = 120
    for r in (reusing, always):
        k, v = seq.kv(0, n)
        r.start(k, v, seq.q(n - 1))
    for n in lockstep([reusing, always], seq, n, 40):
        a, b = reusing.view(), always.view()
        for name in ("all_keys", "all_values", "mask", "slot_pages"):
            assert torch.equal(T(getattr(a, name)), T(getattr(b, name))), name
        check_view(reusing, a, seq, [n] * seq.B)
    got, ref = reusing.stats(), always.stats()
    assert 0 < got.selections_reused < 40 and ref.selections_reused == 0  # not after a spill
    assert (got.pages_recalled, got.heads_corrected) == (ref.pages_recalled, ref.heads_corrected)
    reusing.close()
    always.close()


@pytest.mark.parametrize("spec", [f"freekv:budget=60,{SMALL},tau=0.9", f"freekv:budget=60,{SMALL},tau=0.9,pool_dtype=int8",
                                  f"freekv:budget=60,{SMALL},combine=mean,drift=min,pool_dtype=fp16",
                                  f"quest:budget=60,{SMALL}"])
def test_numpy_and_torch_backends_decode_identically(spec):
    """The CPU backend (numpy) and the GPU code path (torch, run on the CPU) are one algorithm: step by
    step the same pages in the same slots, the same view contents and mask, the same counters."""
    from kvtrt.runtime.kv.backend import NumpyBackend, TorchBackend

    seq = Seq(L=2, B=2, Hkv=2, G=3, D=16, total=330, seed=11, drift=0.3)
    r_np = retrieval(spec).create(seq.L, seq.Hkv, seq.H, seq.D, seq.B, backend=NumpyBackend())
    r_t = retrieval(spec).create(seq.L, seq.Hkv, seq.H, seq.D, seq.B, backend=TorchBackend("cpu"))
    k, v = seq.kv(0, 150)
    for r in (r_np, r_t):
        r.start([x.clone() for x in k], [x.clone() for x in v], seq.q(149))
    # exact, but int8 pages: lo + q * step rounds once in torch's fused addcmul, twice in numpy (1 ulp)
    tolerance = dict(rtol=1e-6, atol=1e-6) if "int8" in spec else dict(rtol=0, atol=0)
    recalled = 0
    for n in lockstep([r_np, r_t], seq, 150, 150):
        a, b = r_np.view(), r_t.view()
        assert T(a.slot_pages).tolist() == b.slot_pages.tolist(), n
        assert T(a.mask).tolist() == b.mask.tolist(), n
        torch.testing.assert_close(T(a.all_kv), b.all_kv, **tolerance)
        recalled = r_t.stats().pages_recalled
    stats_np, stats_t = r_np.stats().as_dict(), r_t.stats().as_dict()
    timings = [key for key in stats_np if key.endswith("_s") or "_s_" in key]  # wall clock
    assert {k: v for k, v in stats_np.items() if k not in timings} == {k: v for k, v in stats_t.items() if k not in timings}
    assert recalled > 0 and stats_t["steps"] == 150  # pages moved: the comparison covered recalls
    for r in (r_np, r_t):
        r.close()
