"""FreeKV/Quest page pool precision (``pool_dtype=fp32|fp16|int8``) and the pool as the only full
copy of the KV (``dense_store_bytes_after_start``). Pool and manager tests run on both array backends
(the ``backend`` fixture: numpy, the CPU default, and torch, the GPU code path run on the CPU);
outputs are compared as torch tensors through ``T`` (zero-copy)."""

from __future__ import annotations

import gc

import pytest
import torch

import kvtrt
from kvtrt.runtime.kv.pages import INT8_SCHEMES, PagePool
from kvtrt.runtime.kv.spec import KVSpecError, parse_kv_spec, parse_stage

from test_freekv import SMALL, Seq, T, attend, lockstep, make

torch.set_num_threads(1)

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6

# Stated tolerances of a recalled page against the page written (max abs error):
#   fp16: round to nearest half, |x' - x| <= 2**-11 * |x| (normal range) <= 2**-11 * max|x| of the page;
#   int8: codes on lo + q * step with step = range_of_the_granule / 255, |x' - x| <= step / 2, so at most
#         range_of_the_page / 510 (the granule's range is never wider than the page's); a little float
#         slack (the affine map is evaluated in float32) is allowed on top.
FP16_REL = 2.0 ** -11
INT8_REL = 1.0 / 510


def kv_with_outliers(L, Hkv, n, D, seed=0):
    """Keys with a few large-magnitude channels and a per-channel offset (like RoPE'd LLM keys)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, Hkv, n, D, generator=g) + torch.randn(L, Hkv, 1, D, generator=g) * 2
    k[..., :3] *= 8
    v = torch.randn(L, Hkv, n, D, generator=g) * torch.rand(L, Hkv, n, 1, generator=g) * 3
    return k, v


# ----------------------------------------------------------------------------- spec


def test_pool_dtype_option_default_and_round_trip():
    assert parse_stage("freekv:budget=1024").pool_dtype == "fp16"
    for text in ("freekv:budget=1024,pool_dtype=fp16", "quest:budget=512,pool_dtype=int8",
                 "kvcrush:budget=0.5+freekv:budget=300,pool_dtype=int8,tau=0.8"):
        spec = parse_kv_spec(text)
        assert str(spec) == text and parse_kv_spec(str(spec)) == spec
    assert parse_kv_spec("freekv:budget=1024,pool_dtype=FP16").retrieval.pool_dtype == "fp16"


@pytest.mark.parametrize("spec, message", [
    ("freekv:budget=2000,pool_dtype=bf16", "unknown pool_dtype 'bf16'"),
    ("freekv:budget=2000,pool_dtype=int4", "use one of fp32, fp16, int8"),
    ("quest:budget=2000,pool_dtype=", "'pool_dtype='"),
    ("freekv:budget=2000,pooldtype=fp16", "pool_dtype"),  # the valid options name it
])
def test_bad_pool_dtype_names_the_option(spec, message):
    with pytest.raises(KVSpecError) as err:
        parse_stage(spec, kind="retrieval")
    assert message in str(err.value)


def test_int8_pool_refused_on_a_device_without_host_dequantization():
    seq = Seq()
    with pytest.raises(KVSpecError, match="pool_dtype=int8 .* use pool_dtype=fp16"):
        make(f"freekv:budget=44,{SMALL},pool_dtype=int8", seq, None, device="cuda")


# ----------------------------------------------------------------------------- pool


@pytest.mark.parametrize("pool_dtype, scheme", [("fp32", None), ("fp16", None),
                                                ("int8", ("channel", "channel")), ("int8", ("page", "page")),
                                                ("int8", ("channel", "token")), ("int8", ("page", "token"))])
def test_recalled_pages_within_tolerance(pool_dtype, scheme, backend):
    L, B, Hkv, D, page, n_pages = 2, 2, 2, 16, 8, 7
    kw = {} if scheme is None else {"int8_scheme": scheme}
    exact = PagePool(L, B, Hkv, D, page, capacity=2, backend=backend)
    # grows while appending
    pool = PagePool(L, B, Hkv, D, page, capacity=2, pool_dtype=pool_dtype, backend=backend, **kw)
    for b in range(B):
        k, v = kv_with_outliers(L, Hkv, n_pages * page, D, seed=b)
        for p in (exact, pool):
            p.append(b, k[:, :, : 3 * page], v[:, :, : 3 * page])
            p.append(b, k[:, :, 3 * page:], v[:, :, 3 * page:])
    # selection summaries are the fp32 ones, from the unrounded keys
    written = (slice(None),) * 3 + (slice(0, n_pages),)  # pages past n_pages are never written (nor read)
    assert torch.equal(T(pool.kmin[written]), T(exact.kmin[written]))
    assert torch.equal(T(pool.kmax[written]), T(exact.kmax[written]))
    worst = 0.0
    for layer in range(L):
        for b in range(B):
            for pid in range(n_pages):
                for got, want in zip(pool.page_kv(layer, b, pid), exact.page_kv(layer, b, pid)):
                    assert backend.is_array(got) and backend.is_array(want)
                    got, want = T(got), T(want)
                    assert got.dtype == torch.float32
                    err = (got - want).abs().amax(dim=(-2, -1))  # per KV head
                    if pool_dtype == "fp32":
                        assert torch.equal(got, want)
                    elif pool_dtype == "fp16":
                        bound = FP16_REL * want.abs().amax(dim=(-2, -1))
                        assert (err <= bound).all()
                    else:
                        span = want.amax(dim=(-2, -1)) - want.amin(dim=(-2, -1))
                        assert (err <= span * INT8_REL * (1 + 1e-4) + 1e-6).all()
                        worst = max(worst, float((err / span).max()))
    if pool_dtype == "int8":
        assert worst > 0  # it is quantized


def test_int8_per_channel_beats_one_scale_per_page(backend):
    """The default int8 granules (keys and values per channel within a page) on keys with outlier
    channels: well below the per-page scheme's error."""
    L, Hkv, D, page, n = 2, 2, 32, 32, 8
    k, v = kv_with_outliers(L, Hkv, n * page, D, seed=3)
    errs = {}
    for scheme in (("page", "page"), ("channel", "channel")):
        pool = PagePool(L, 1, Hkv, D, page, capacity=n, pool_dtype="int8", int8_scheme=scheme, backend=backend)
        pool.append(0, k, v)
        rows = torch.stack([torch.stack([T(x) for x in pool.page_kv(layer, 0, p)]) for layer in range(L)
                            for p in range(n)])
        ref = torch.stack([torch.stack([k[layer, :, p * page:(p + 1) * page], v[layer, :, p * page:(p + 1) * page]])
                           for layer in range(L) for p in range(n)])
        errs[scheme] = ((rows - ref) ** 2).mean(dim=(0, 2, 3, 4)).sqrt()  # RMS error of K, of V
    (k_channel, v_channel), (k_page, v_page) = errs[("channel", "channel")], errs[("page", "page")]
    assert k_channel < 0.5 * k_page and v_channel < v_page
    assert set(INT8_SCHEMES) == {"page", "channel", "token"}


@pytest.mark.parametrize("pool_dtype", ["fp16", "int8"])
def test_quantized_pool_views_match_fp32_selection_and_tokens(pool_dtype, backend):
    """In lockstep with an fp32 manager: the same pages selected (fp32 summaries), the same masks,
    sink/recent tokens exact, page slots within the stated tolerance of the fp32 pages."""
    seq = Seq(L=2, B=2, total=260, seed=11, drift=0.3)
    for v in seq.values:  # no token ids in channel 0: plain random values (ids would dominate the range)
        v[..., 0] = torch.randn(v.shape[:-1], generator=torch.Generator().manual_seed(1))
    ref = make(f"freekv:budget=44,{SMALL},tau=0.8", seq, backend, threaded=False)
    low = make(f"freekv:budget=44,{SMALL},tau=0.8,pool_dtype={pool_dtype}", seq, backend, threaded=False)
    n = 150
    for r in (ref, low):
        k, v = seq.kv(0, n)
        r.start(list(k), list(v), seq.q(n - 1))
    lay = ref.layout
    pages = slice(lay.sink, lay.ring_start)
    for n in [n, *lockstep([ref, low], seq, n, 40)]:
        a, b = ref.view(), low.view()
        assert torch.equal(T(a.slot_pages), T(b.slot_pages)) and torch.equal(T(a.mask), T(b.mask))
        for x, y in ((T(a.all_keys), T(b.all_keys)), (T(a.all_values), T(b.all_values))):
            assert torch.equal(x[..., : lay.sink, :], y[..., : lay.sink, :])
            assert torch.equal(x[..., lay.ring_start:, :], y[..., lay.ring_start:, :])
            err = (x[..., pages, :] - y[..., pages, :]).abs().max()
            scale = x[..., pages, :].abs().max() if pool_dtype == "fp16" else \
                x[..., pages, :].max() - x[..., pages, :].min()
            assert err <= scale * (FP16_REL if pool_dtype == "fp16" else INT8_REL * (1 + 1e-4)) + 1e-6
            assert pool_dtype == "fp16" or err > 0
        # attention over the view moves by little
        q = seq.q(n)
        for layer in range(seq.L):
            got = attend(q[layer], b.keys[layer], b.values[layer], b.mask)
            want = attend(q[layer], a.keys[layer], a.values[layer], a.mask)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-2 if pool_dtype == "fp16" else 0.1)
    assert ref.stats().pages_recalled == low.stats().pages_recalled
    ref.close()
    low.close()


def test_pool_bytes_halved_and_quartered(backend):
    seq = Seq(L=2, B=1, Hkv=2, G=2, D=64, total=400, seed=2)
    sizes = {}
    for pool_dtype in ("fp32", "fp16", "int8"):
        r = make(f"freekv:budget=200,page=32,sink=4,window=64,pool_dtype={pool_dtype}", seq, backend)
        k, v = seq.kv(0, 300)
        r.start(list(k), list(v), seq.q(299), reserve_tokens=60)
        st = r.stats()
        assert st.pool_dtype == pool_dtype and r.nbytes == st.stored_bytes + st.view_bytes
        sizes[pool_dtype] = st
        r.close()
    fp32, fp16, int8 = (sizes[d].pool_bytes for d in ("fp32", "fp16", "int8"))
    cap, page, D = -(-(360 - 4 - 64) // 32), 32, 64
    rows = seq.L * seq.B * cap * seq.Hkv
    assert fp32 == rows * 2 * page * D * 4
    assert fp16 * 2 == fp32
    assert int8 == fp32 // 4 + rows * 2 * D * 4  # + each value channel's lo and step (float32)
    assert int8 / fp32 < 0.29
    # the summaries, views and sink/recent master copy do not change
    assert len({sizes[d].stored_bytes - sizes[d].pool_bytes for d in sizes}) == 1
    assert len({sizes[d].view_bytes for d in sizes}) == 1
    assert sizes["int8"].recalled_bytes <= sizes["fp32"].recalled_bytes


# ----------------------------------------------------------------------------- the only full copy


@pytest.mark.parametrize("inputs", ["native", "torch"])
def test_dense_store_freed_once_the_pool_exists(inputs, backend):
    """Handed over (`release=True`) and held nowhere else, the prompt's dense KV is gone when `start`
    returns (stats say 0 bytes); kept by the caller, the stats count it. The KV comes as the backend's
    own arrays (`native`: what the runtime hands over) or as torch CPU tensors (which the numpy
    backend accepts too, converted without a copy)."""
    if inputs == "torch" and backend.name == "torch":
        pytest.skip("the torch backend's own arrays are torch tensors: the `native` case")

    def own(t):  # a copy with its own buffer, referenced by the caller's list only
        return backend.clone(backend.asarray(t)) if inputs == "native" else t.clone()

    def nbytes(t):
        return backend.nbytes(t) if inputs == "native" else t.numel() * t.element_size()

    seq = Seq(L=3, B=1, total=200, seed=3)
    handed = make(f"freekv:budget=44,{SMALL}", seq, backend)
    keys = [own(t) for t in seq.keys]  # own storages, referenced by these lists only
    values = [own(t) for t in seq.values]
    dense = sum(nbytes(t) for t in keys + values)
    handed.start(keys, values, seq.q(199), release=True)
    st = handed.stats()
    assert st.dense_store_bytes_after_start == 0 and st.dense_store_bytes == 0
    assert 0 < st.stored_bytes - st.pool_bytes < dense  # the master copy of sink/recent tokens is small

    kept = make(f"freekv:budget=44,{SMALL}", seq, backend)
    keys = [own(t) for t in seq.keys]
    values = [own(t) for t in seq.values]
    kept.start(keys, values, seq.q(199))  # release=False: the caller keeps them
    assert kept.stats().dense_store_bytes_after_start == dense
    survivor = keys[1]
    del keys, values
    gc.collect()
    assert kept.stats().dense_store_bytes == nbytes(survivor)
    del survivor
    assert kept.stats().dense_store_bytes == 0
    handed.close()
    kept.close()


def test_scheduler_hands_the_prefill_store_over(tiny_llama):
    """Through the runtime (prefill store -> `_RetrievalRow` -> `start(release=True)`): nothing keeps
    the dense prefill KV alive beside the pool."""
    _, _, directory = tiny_llama
    result = kvtrt.load(directory, kv="freekv:budget=64,page=8,window=16,min_context=0").generate(
        PROMPT, max_new_tokens=10)
    kv = result.stats.kv
    assert kv["retrieval_engaged"] == 1
    assert kv["dense_store_bytes_after_start"] == 0
    assert kv["dense_store_bytes"] == 0


# ----------------------------------------------------------------------------- end to end


def test_covering_budget_fp16_pool_decodes_like_the_full_cache(tiny_llama):
    """budget >= context, min_context=0: every page is recalled; an fp16 pool rounds the middle
    pages' K/V to half precision and the greedy tokens still equal the full cache's."""
    _, _, directory = tiny_llama
    full = kvtrt.load(directory).generate(PROMPT, max_new_tokens=60)
    for spec in ("freekv:budget=4096,page=8,window=16,min_context=0,pool_dtype=fp16",
                 "quest:budget=4096,page=8,window=16,min_context=0,pool_dtype=fp16"):
        got = kvtrt.load(directory, kv=spec).generate(PROMPT, max_new_tokens=60)
        assert got.stats.kv["retrieval_engaged"] == 1
        assert got.token_ids == full.token_ids, spec


def test_covering_budget_int8_pool_stays_close(tiny_llama):
    """int8 pool, covering budget: teacher-forced on the full cache's tokens, the log-probabilities
    stay within 0.05 nats of the exact pool's, and greedy decoding agrees on most tokens."""
    from kvtrt.eval.decoding import decode

    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    ids = llm.encode(PROMPT)
    full = llm.generate(PROMPT, max_new_tokens=40)
    base = "freekv:budget=4096,page=8,window=16,min_context=0"
    exact = decode(llm, ids, 40, base, teacher=full.token_ids)
    int8 = decode(llm, ids, 40, base + ",pool_dtype=int8", teacher=full.token_ids)
    assert int8.stats.kv["retrieval_engaged"] == 1
    diff = (torch.tensor(int8.logprobs) - torch.tensor(exact.logprobs)).abs().max()
    assert diff < 0.05, float(diff)
    greedy = kvtrt.load(directory, kv=base + ",pool_dtype=int8").generate(PROMPT, max_new_tokens=40)
    same = sum(a == b for a, b in zip(greedy.token_ids, full.token_ids))
    assert same >= 0.9 * len(full.token_ids)
