"""Compaction policies: exact hand-worked selections, invariants, and spec errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtrt.runtime.kv.policies import (
    H2OPolicy,
    KVCrushPolicy,
    SnapKVPolicy,
    StreamingPolicy,
    anchor_bits,
    block_signatures,
    bucket_starts,
    group_mass,
    hamming_order,
    pool1d,
    signatures,
    unit_sums,
)
from kvtrt.runtime.kv.spec import KVSpec, KVSpecError, parse_kv_spec, parse_stage


def policy(spec: str):
    return parse_kv_spec(spec).compaction


def rows(t: np.ndarray) -> list[list[int]]:
    return t.tolist()


def f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# ---------------------------------------------------------------- building blocks


def test_signatures_mark_top_half_per_head_ties_to_older():
    scores = f32([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 4.0, 1.0]])
    assert rows(signatures(scores).astype(int)) == [[1, 0, 1, 0], [0, 1, 1, 0]]
    odd = f32([[1.0, 1.0, 1.0, 1.0, 1.0]])  # floor(5/2) = 2 ones, the two oldest on ties
    assert rows(signatures(odd).astype(int)) == [[1, 1, 0, 0, 0]]


def test_anchor_modes():
    bits = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [1, 1, 1]], dtype=bool)
    assert anchor_bits("zeros", bits).astype(int).tolist() == [0, 0, 0, 0]
    assert anchor_bits("ones", bits).astype(int).tolist() == [1, 1, 1, 1]
    assert anchor_bits("alternating", bits).astype(int).tolist() == [0, 1, 0, 1]
    assert anchor_bits("mean", bits).astype(int).tolist() == [1, 0, 0, 1]  # majority, 1/3 and 1/3 -> 0
    assert anchor_bits("mean", np.array([[1, 0]], dtype=bool)).astype(int).tolist() == [0]  # tie -> 0
    assert np.array_equal(anchor_bits("random", bits, seed=7), anchor_bits("random", bits, seed=7))
    wide = np.zeros((32, 3), dtype=bool)
    assert not np.array_equal(anchor_bits("random", wide, seed=0), anchor_bits("random", wide, seed=1))


def test_random_anchor_bits_are_torchs():
    """The anchors (numpy's MT19937) are the bits the torch implementation drew: results are unchanged."""
    torch = pytest.importorskip("torch")
    for seed in range(64):
        for length in (1, 2, 3, 9, 32):
            expected = torch.randint(0, 2, (length,), generator=torch.Generator().manual_seed(seed)).bool().numpy()
            assert np.array_equal(anchor_bits("random", np.zeros((length, 1), dtype=bool), seed), expected)



@pytest.mark.parametrize("how", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 5, 15, 31])
def test_pooling_and_unit_sums_equal_torchs_kernels_bit_for_bit(how, kernel):
    """The float steps of the numpy policies round as torch's did (avg_pool1d / max_pool1d, index_add_,
    mean over a group), so SnapKV and KVCrush pick what the torch implementation picked, ties included."""
    torch = pytest.importorskip("torch")
    x = (np.random.default_rng(kernel).standard_normal((3, 3, 997)) ** 2).astype(np.float32)
    mass = group_mass(x)
    assert np.array_equal(mass, torch.from_numpy(x).mean(dim=1).numpy())
    pool = torch.nn.functional.avg_pool1d if how == "avg" else torch.nn.functional.max_pool1d
    expected = pool(torch.from_numpy(mass)[:, None], kernel, stride=1, padding=kernel // 2)[:, 0].numpy()
    assert np.array_equal(pool1d(mass, kernel, how), expected)
    unit_of = np.arange(997) // 32
    expected = torch.zeros(3, 32).index_add_(1, torch.from_numpy(unit_of), torch.from_numpy(mass)).numpy()
    assert np.array_equal(unit_sums(mass, unit_of, 32), expected)


def test_policies_take_torch_tensors_and_numpy_arrays_alike():
    torch = pytest.importorskip("torch")
    scores = np.random.default_rng(3).random((3, 3, 300), dtype=np.float32)
    for spec in ("snapkv:budget=64", "kvcrush:budget=64,signature=query", "h2o:budget=64,block=4"):
        kept = policy(spec).select(scores, 64)
        assert isinstance(kept, np.ndarray) and kept.shape == (3, 64)
        assert np.array_equal(policy(spec).select(torch.from_numpy(scores), 64), kept)

def test_hamming_order_is_stable():
    # columns (b0 b1): 11, 10, 00, 01, 00, 11  -> distance to 01: 1, 2, 1, 0, 1, 1
    bits = np.array([[1, 1, 0, 0, 0, 1], [1, 0, 0, 1, 0, 1]], dtype=bool)
    anchor = np.array([False, True])
    assert hamming_order(bits, anchor).tolist() == [3, 0, 2, 4, 5, 1]


def test_bucket_starts_spread_over_whole_order():
    assert bucket_starts(10, 3).tolist() == [0, 3, 6]
    assert bucket_starts(9, 3).tolist() == [0, 3, 6]
    assert bucket_starts(5, 2).tolist() == [0, 2]
    assert bucket_starts(4, 4).tolist() == [0, 1, 2, 3]
    assert bucket_starts(7, 1).tolist() == [0]


# ---------------------------------------------------------------- baselines


def test_streaming_keeps_sink_and_latest_ignoring_scores():
    scores = np.random.default_rng(0).random((2, 10), dtype=np.float32)
    assert rows(policy("streaming:sink=2,window=3").select(scores, 5)) == [[0, 1, 7, 8, 9]] * 2
    grown = policy("streaming:sink=2,window=3,budget=7")
    assert grown.budget_tokens(10) == 7
    assert rows(grown.select(scores, 7)) == [[0, 1, 5, 6, 7, 8, 9]] * 2
    assert policy("streaming:window=60").budget_tokens(1000) == 64  # sink defaults to 4


def test_h2o_keeps_heavy_hitters_per_head():
    scores = f32(
        [
            [9.0, 0.1, 5.0, 0.2, 0.3, 4.0, 0.4, 0.0, 0.0, 0.0],
            [9.0, 3.0, 0.1, 0.2, 6.0, 0.3, 0.4, 0.0, 0.0, 0.0],
        ]
    )
    p = policy("h2o:budget=5,sink=1,window=2")
    assert rows(p.select(scores, 5)) == [[0, 2, 5, 8, 9], [0, 1, 4, 8, 9]]


def test_snapkv_pools_before_the_window():
    scores = f32([[0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 9.0, 9.0]])
    avg = policy("snapkv:budget=4,sink=0,window=2,kernel=3")
    assert avg.token_scores(scores).tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 9.0, 9.0]]
    assert rows(avg.select(scores, 4)) == [[1, 2, 6, 7]]  # pooled ties: the older slots
    mx = policy("snapkv:budget=4,sink=0,window=2,kernel=3,pool=max")
    assert mx.token_scores(scores).tolist() == [[0.0, 3.0, 3.0, 3.0, 0.0, 0.0, 9.0, 9.0]]
    assert rows(policy("h2o:budget=4,sink=0,window=2").select(scores, 4)) == [[0, 2, 6, 7]]


def test_short_context_keeps_everything():
    scores = np.random.default_rng(1).random((3, 5), dtype=np.float32)
    for spec in ("streaming:window=8", "h2o:budget=40", "kvcrush:budget=40,page=4,granularity=page"):
        assert rows(policy(spec).select(scores, 40)) == [[0, 1, 2, 3, 4]] * 3


# ---------------------------------------------------------------- KVCrush, exact


def _two_head_scores() -> np.ndarray:
    # Base h2o (sink=1, window=1, keep 3) keeps slots 0, 1, 11 on both heads; candidates 2..10
    # get top-4 bits  (b0 b1): 2:11 3:11 4:10 5:10 6:01 7:01 8:00 9:00 10:00
    return f32(
        [
            [1.0, 20.0, 9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
            [1.0, 20.0, 9.0, 8.0, 1.0, 1.0, 7.0, 6.0, 1.0, 1.0, 1.0, 0.0],
        ]
    )


@pytest.mark.parametrize(
    ("anchor", "expected"),
    [
        ("zeros", [0, 1, 4, 7, 8, 11]),  # order 8 9 10 | 4 5 6 | 7 2 3
        ("mean", [0, 1, 4, 7, 8, 11]),  # balanced bits: the majority is all zeros
        ("ones", [0, 1, 2, 5, 8, 11]),  # order 2 3 4 | 5 6 7 | 8 9 10
        ("alternating", [0, 1, 3, 6, 10, 11]),  # anchor 01: order 6 7 2 | 3 8 9 | 10 4 5
    ],
)
def test_kvcrush_anchor_hamming_order_and_bucket_representatives(anchor, expected):
    p = policy(f"kvcrush:budget=6,base=h2o,sink=1,window=1,ratio=0.5,anchor={anchor},pick=first")
    assert p.split(6) == (3, 3)
    assert rows(p.select(_two_head_scores(), 6)) == [expected, expected]


def test_kvcrush_random_anchor_matches_its_bits():
    scores = _two_head_scores()
    by_anchor = {
        (0, 0): [0, 1, 4, 7, 8, 11],
        (1, 1): [0, 1, 2, 5, 8, 11],
        (0, 1): [0, 1, 3, 6, 10, 11],
        (1, 0): [0, 1, 3, 4, 10, 11],  # order 4 5 2 | 3 8 9 | 10 6 7
    }
    for seed in range(6):
        p = policy(f"kvcrush:budget=6,base=h2o,sink=1,window=1,ratio=0.5,seed={seed},pick=first")
        bits = tuple(anchor_bits("random", np.zeros((2, 1), dtype=bool), seed).astype(int).tolist())
        assert rows(p.select(scores, 6)) == [by_anchor[bits]] * 2
        assert np.array_equal(p.select(scores, 6), p.select(scores, 6))


def test_kvcrush_duplicate_representative_is_replaced_within_its_bucket():
    # h2o keeps slot 8 on head 0 and slot 1 on head 1; candidates 1..10, top-5 bits
    # (b0 b1): 1:01 2:11 3:11 4:10 5:10 6:01 7:01 8:10 9:00 10:00; anchor 01 ->
    # order 1 6 7 | 2 3 9 | 10 4 5 8 -> representatives 1, 2, 10; head 1 already keeps 1 -> 6.
    scores = f32(
        [
            [0.0, 1.0, 9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 100.0, 1.0, 1.0, 0.0],
            [0.0, 100.0, 9.0, 8.0, 1.0, 1.0, 7.0, 6.0, 1.0, 1.0, 1.0, 0.0],
        ]
    )
    p = policy("kvcrush:budget=6,base=h2o,sink=1,window=1,ratio=0.5,anchor=alternating,pick=first")
    assert rows(p.select(scores, 6)) == [[0, 1, 2, 8, 10, 11], [0, 1, 2, 6, 10, 11]]


def _page_scores(n: int) -> np.ndarray:
    scores = np.ones((2, n), dtype=np.float32)
    scores[:, 4:8] = 10.0  # page 1: kept by the base on both heads
    return scores


def test_kvcrush_page_granularity_whole_pages_and_remainder_to_base():
    # sink 0-3 | pages 1..5 = slots 4..23 | window 24..27. keep 20: reps round(0.5*20)=10 -> 8 (2 pages),
    # the remainder 2 goes to the base (12 = sink + window + page 1). Candidates: pages 2..5, top-2 bits
    # (b0 b1): p2:11 p3:10 p4:01 p5:00; anchor zeros -> order p5 p3 | p4 p2 -> pages 5 and 4.
    scores = _page_scores(28)
    scores[0, 8:12], scores[0, 12:16] = 5.0, 4.0
    scores[1, 8:12], scores[1, 16:20] = 5.0, 4.0
    p = policy("kvcrush:budget=20,base=h2o,sink=4,window=4,ratio=0.5,anchor=zeros,granularity=page,page=4,pick=first")
    assert p.split(20) == (12, 8)
    expected = list(range(0, 8)) + list(range(16, 28))
    assert rows(p.select(scores, 20)) == [expected, expected]


def test_kvcrush_short_edge_page_is_topped_up_from_the_next_priority():
    # sink 0-1 | pages cut to the middle: p0={2,3} p1={4..7} p2={8..11} p3={12..15} p4={16,17} | 18,19.
    # Base keeps p1; candidates p0 p2 p3 p4, bits p0:11 p2:10 p3:01 p4:00; anchor zeros ->
    # order p4 p2 | p3 p0 -> p4 (2 tokens) + p3 (4 tokens); the missing 2 come from the next
    # priority, p2 (rank 1 of bucket 0), oldest slots first: 8, 9.
    scores = _page_scores(20)
    scores[0, 2:4], scores[0, 8:12] = 5.0, 4.0
    scores[1, 12:16], scores[1, 2:4] = 5.0, 4.0
    p = policy("kvcrush:budget=16,base=h2o,sink=2,window=2,ratio=0.5,anchor=zeros,granularity=page,page=4,pick=first")
    assert p.split(16) == (8, 8)
    expected = [0, 1, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19]
    assert rows(p.select(scores, 16)) == [expected, expected]


# sink 0,1 | pages p0={0..3} p1={4..7} p2={8..11} p3={12..15} | window 14,15. Both heads score slot s
# with VALUES[s] / 2; the middle's top six (summed over heads) are 12 3 5 7 9 10, so the block
# signatures (bit j = slot p*4+j marked) are p0:0001 p1:0101 p2:0110 p3:1000.
BLOCK_VALUES = [9, 9, 1, 8, 2, 7, 3, 6, 0, 5, 4, 0.5, 10, 0.1, 9, 9]


def test_block_signatures_mark_the_top_half_of_the_taking_part_slots_per_page_position():
    values = f32(BLOCK_VALUES)
    middle = np.zeros(16, dtype=bool)
    middle[2:14] = True
    bits = block_signatures(np.where(middle, values, -np.inf), int(middle.sum()), 4)
    assert rows(bits.T.astype(int)) == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]]
    short = block_signatures(f32([3.0, 1.0, 2.0, 0.0, 5.0]), 5, 4)  # top 2: slots 4, 0
    assert rows(short.T.astype(int)) == [[1, 0, 0, 0], [1, 0, 0, 0]]  # p1 = slot 4 + three missing positions


@pytest.mark.parametrize(
    ("signature", "anchor", "taken"),
    [
        # base (h2o, keep 8) holds sink, window and 12 3 5 7; reps: one page of 4 tokens, one bucket.
        # block, anchor 0000: distances p0:1 p1:2 p2:2 p3:1 -> p0 (slot 2), p3 (13), p1 (4, 6)
        ("block", "zeros", [2, 4, 6, 13]),
        # block, anchor 0101: p1:0 p0:1 p2:2 p3:3 -> p1 (4, 6), p0 (2), p2 (8)
        ("block", "alternating", [2, 4, 6, 8]),
        # kv: mean mass p0 4.5 p1 4.5 p2 2.375 p3 5.05 -> bits p0:1 p1:0 p2:0 p3:1 on both heads;
        # anchor 00: p1 p2 p0 p3 -> p1 (4, 6), p2 (8, 9)
        ("kv", "zeros", [4, 6, 8, 9]),
    ],
)
def test_kvcrush_signature_modes_pick_expected_pages(signature, anchor, taken):
    scores = np.tile(f32(BLOCK_VALUES), (2, 1)) / 2
    p = policy(f"kvcrush:budget=12,base=h2o,sink=2,window=2,ratio=0.5,anchor={anchor},granularity=page,page=4,pick=first,"
               f"signature={signature}")
    assert p.split(12) == (8, 4)
    expected = sorted([0, 1, 3, 5, 7, 12, 14, 15] + taken)
    assert rows(p.select(scores, 12)) == [expected, expected]


def test_kvcrush_query_signature_reads_each_query_head():
    # one KV head, two query heads; middle slots 1..6. Base (h2o, group mean) keeps 3 (.9) and 4 (.8);
    # candidates 1 2 5 6. kv bits (mean .5 .5 .15 .1, top two): 1 1 0 0 -> anchor 0: order 5 6 1 2 -> 5.
    # query bits (h0 top two: 1 5; h1: 2 6): 10 01 10 01 -> all at distance 1 -> order 1 2 5 6 -> 1.
    h0 = [1.0, 1.0, 0.0, 0.9, 0.8, 0.3, 0.0, 1.0]
    h1 = [1.0, 0.0, 1.0, 0.9, 0.8, 0.0, 0.2, 1.0]
    scores = f32([[h0, h1]])  # [Hkv=1, g=2, N=8]
    spec = "kvcrush:budget=5,base=h2o,sink=1,window=1,ratio=0.2,anchor=zeros,pick=first,signature="
    assert policy(spec + "query").split(5) == (4, 1)
    assert rows(policy(spec + "kv").select(scores, 5)) == [[0, 3, 4, 5, 7]]
    assert rows(policy(spec + "query").select(scores, 5)) == [[0, 1, 3, 4, 7]]
    assert rows(policy(spec + "kv").select(scores.mean(axis=1), 5)) == [[0, 3, 4, 5, 7]]  # [Hkv, N] as before
    with pytest.raises(ValueError, match="signature=query needs per-query-head scores"):
        policy(spec + "query").select(scores.mean(axis=1), 5)


@pytest.mark.parametrize(("pick", "pages"), [("first", [2, 0]), ("best", [1, 3])])
def test_kvcrush_pick_best_takes_the_bases_favourite_inside_each_bucket(pick, pages):
    # no sink, window or base share: two pages of representatives. Top eight of sixteen: 12 0 1 14 15 3 5 7,
    # block bits p0:1101 p1:0101 p2:0000 p3:1011; anchor 0000 -> order p2 p1 | p0 p3. first: p2, p0.
    # best (mean value p0 6.75 p1 4.5 p2 2.375 p3 7.025): p1 (not p2) and p3 (not p0); the two best
    # pages overall, p3 and p0, share a bucket, so best is not a plain top-k.
    scores = np.tile(f32(BLOCK_VALUES), (2, 1)) / 2
    p = policy(f"kvcrush:budget=8,base=h2o,sink=0,window=0,ratio=1,anchor=zeros,granularity=page,page=4,"
               f"signature=block,pick={pick}")
    assert p.split(8) == (0, 8)
    expected = sorted(4 * page + j for page in pages for j in range(4))
    assert rows(p.select(scores, 8)) == [expected, expected]


def test_block_selection_keeps_whole_blocks_by_their_mean():
    # sink 0 | blocks of 4 cut to the middle: b0={1,2,3} mean 5/3, b1={4..7} mean 1, b2={8,9,10} mean 2 | 11.
    # Tokens alone: 8 2 4 5. Blocks: b2 whole (8, then 9 10 in slot order), then b0's best slot, 2.
    scores = f32([[9.0, 0, 5, 0, 1, 1, 1, 1, 6, 0, 0, 9]])
    assert rows(policy("h2o:budget=6,sink=1,window=1").select(scores, 6)) == [[0, 2, 4, 5, 8, 11]]
    assert rows(policy("h2o:budget=6,sink=1,window=1,block=4").select(scores, 6)) == [[0, 2, 8, 9, 10, 11]]
    assert rows(policy("snapkv:budget=6,sink=1,window=1,kernel=1,block=4").select(scores, 6)) == [[0, 2, 8, 9, 10, 11]]
    crush = policy("kvcrush:budget=6,base=h2o,sink=1,window=1,block=4,ratio=0")
    assert crush.base.block == 4 and rows(crush.select(scores, 6)) == [[0, 2, 8, 9, 10, 11]]


def test_block_signature_needs_pages():
    with pytest.raises(KVSpecError, match="signature=block.*granularity=page"):
        policy("kvcrush:budget=64,signature=block")


def test_kvcrush_budget_split():
    assert policy("kvcrush:budget=100").split(100) == (75, 25)  # defaults: ratio 0.25, sink 4, window 32
    assert policy("kvcrush:budget=100,ratio=1").split(100) == (36, 64)  # base keeps sink + window
    assert policy("kvcrush:budget=100,ratio=0").split(100) == (100, 0)
    assert policy("kvcrush:budget=0.5,granularity=page").split(100) == (100, 0)  # 25 < one page of 32
    assert policy("kvcrush:budget=200,granularity=page").split(200) == (168, 32)  # 50 -> 32 + 18 to base
    assert policy("kvcrush:budget=200,granularity=page,page=16").split(200) == (152, 48)


def test_kvcrush_defaults():
    p = policy("kvcrush:budget=0.25")
    assert isinstance(p, KVCrushPolicy) and isinstance(p.base, SnapKVPolicy)
    assert (p.ratio, p.anchor, p.granularity, p.page, p.seed) == (0.25, "random", "token", 32, 0)
    assert (p.signature, p.pick) == ("kv", "best")
    assert (p.sink, p.window, p.base.kernel, p.base.block) == (4, 32, 15, 1)
    assert p.budget_tokens(1000) == 250
    assert isinstance(policy("kvcrush:budget=64,base=streaming").base, StreamingPolicy)
    assert policy("kvcrush:budget=64,base=h2o,window=8").window == 8
    assert isinstance(policy("h2o:budget=64"), H2OPolicy)
    assert parse_stage("full") is None and parse_kv_spec("full").compaction is None


# ---------------------------------------------------------------- properties

SPECS = st.one_of(
    st.builds(lambda s, w, b: f"streaming:sink={s},window={w}" + (f",budget={b}" if b else ""),
              st.integers(0, 4), st.integers(1, 8), st.sampled_from([None, 0.5, 20])),
    st.builds(lambda s, w: f"h2o:budget=0.5,sink={s},window={w}", st.integers(0, 4), st.integers(0, 8)),
    st.builds(lambda s, w, k, pool: f"snapkv:budget=0.5,sink={s},window={w},kernel={k},pool={pool}",
              st.integers(0, 4), st.integers(0, 8), st.sampled_from([1, 3, 5, 7]), st.sampled_from(["avg", "max"])),
    st.builds(
        lambda base, s, w, r, a, g, page, seed: (
            f"kvcrush:budget=0.5,base={base},sink={s},window={w},ratio={r},anchor={a},seed={seed}"
            + (f",granularity=page,page={page}" if g else "")
        ),
        st.sampled_from(["snapkv", "h2o", "streaming"]), st.integers(0, 4), st.integers(0, 8),
        st.sampled_from([0, 0.1, 0.25, 0.5, 0.9, 1]), st.sampled_from(["random", "zeros", "ones", "mean", "alternating"]),
        st.booleans(), st.integers(1, 8), st.integers(0, 3),
    ),
)


def _scores(heads: int, n: int, seed: int, ties: bool) -> np.ndarray:
    g = np.random.default_rng(seed)
    if ties:  # few distinct values, many exact ties
        return g.integers(0, 3, (heads, n)).astype(np.float32)
    return g.random((heads, n), dtype=np.float32)


@settings(max_examples=300, deadline=None)
@given(spec=SPECS, heads=st.integers(1, 4), n=st.integers(1, 80), extra=st.integers(0, 40),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_every_policy_keeps_budget_sink_window_without_duplicates(spec, heads, n, extra, seed, ties):
    p = policy(spec)
    keep = max(1, p.sink + p.window + extra)
    scores = _scores(heads, n, seed, ties)
    kept = p.select(scores, keep)
    assert kept.dtype == np.int64 and kept.shape == (heads, min(keep, n))
    assert bool((kept[:, 1:] > kept[:, :-1]).all())  # sorted ascending, hence unique
    assert int(kept.min()) >= 0 and int(kept.max()) < n
    protected = set(range(min(p.sink, n))) | set(range(max(n - p.window, 0), n))
    for row in kept.tolist():
        assert protected <= set(row)
    assert np.array_equal(kept, policy(spec).select(scores.copy(), keep))  # deterministic, fresh instance
    if isinstance(p, KVCrushPolicy) and n > keep:
        base_keep, reps = p.split(keep)
        base = p.base.select(scores, base_keep)
        for full, share in zip(kept.tolist(), base.tolist()):
            assert set(share) <= set(full)
        if reps == 0:
            assert np.array_equal(kept, base)
        if isinstance(p.base, StreamingPolicy):  # same base share on every head -> same representatives
            assert all(row == kept[0].tolist() for row in kept.tolist())


@settings(max_examples=100, deadline=None)
@given(spec=SPECS)
def test_spec_text_round_trips(spec):
    parsed = parse_kv_spec(spec)
    assert str(parsed) == spec  # rendered as written
    again = parse_kv_spec(str(parsed))
    assert again == parsed and hash(again) == hash(parsed)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.compaction = None


def test_policy_built_in_python_renders_its_options():
    p = KVCrushPolicy(budget=64, base=H2OPolicy(budget=64, window=8), anchor="zeros")
    assert str(p) == "kvcrush:budget=64,base=h2o,anchor=zeros,window=8"
    assert parse_kv_spec(str(p)).compaction == p
    assert str(KVSpec(SnapKVPolicy(budget=0.25, kernel=3))) == "snapkv:budget=0.25,kernel=3"
    assert str(KVSpec()) == "full" and parse_kv_spec("full").is_full


@settings(max_examples=100, deadline=None)
@given(sink=st.integers(0, 8), window=st.integers(0, 40), context=st.integers(1, 2000),
       fraction=st.sampled_from(["0.01", "0.1", "0.25", "0.5", "0.9"]))
def test_budget_tokens_resolves_or_explains(sink, window, context, fraction):
    p = policy(f"h2o:budget={fraction},sink={sink},window={window}")
    want = max(1, round(float(fraction) * context))
    if want >= sink + window:
        assert p.budget_tokens(context) == want
    else:
        with pytest.raises(KVSpecError, match=rf"gives {want} tokens at a context of {context}.*sink\+window"):
            p.budget_tokens(context)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lru:budget=3", r"unknown KV policy 'lru'.*snapkv"),
        ("h2o:budget=64,kernal=5", r"unknown option 'kernal' for h2o.*valid options: budget, sink, window"),
        ("kvcrush:budget=64,base=h2o,kernel=5", r"unknown option 'kernel'.*valid options: .*anchor.*sink, window, block$"),
        ("snapkv:budget=64,granularity=page", r"unknown option 'granularity' for snapkv"),
        ("h2o:budget=lots", r"budget='lots' is not a number"),
        ("h2o:budget=64,sink=two", r"sink='two'.* is not a whole number"),
        ("h2o:budget=64,window=-1", r"window=-1 .*must be at least 0"),
        ("h2o:sink=4", r"h2o needs a budget.*budget=0.25"),
        ("kvcrush:ratio=0.5", r"kvcrush needs a budget"),
        ("h2o:budget=16", r"h2o: budget=16 gives 16 tokens, fewer than sink\+window = 4\+32 = 36.*at least 36"),
        ("streaming:sink=4,window=8,budget=10", r"fewer than sink\+window = 4\+8 = 12"),
        ("kvcrush:budget=64,ratio=1.5", r"ratio=1.5 .*outside \[0, 1\]"),
        ("kvcrush:budget=64,ratio=-0.1", r"ratio=-0.1 .*outside \[0, 1\]"),
        ("kvcrush:budget=64,ratio=half", r"ratio='half' .*not a number"),
        ("kvcrush:budget=64,anchor=median", r"unknown anchor 'median'.*random, zeros, ones, mean, alternating"),
        ("kvcrush:budget=64,base=lru", r"unknown base 'lru'.*snapkv, h2o, streaming"),
        ("kvcrush:budget=64,granularity=block", r"unknown granularity 'block'.*token, page"),
        ("kvcrush:budget=64,page=16", r"page= .*only applies with granularity=page"),
        ("kvcrush:budget=64,granularity=page,page=0", r"page=0 .*at least 1"),
        ("snapkv:budget=64,kernel=4", r"kernel=4 .*must be odd"),
        ("snapkv:budget=64,pool=sum", r"unknown pool 'sum'.*avg, max"),
        ("streaming:sink=4", r"streaming needs window="),
        ("streaming:sink=0,window=0", r"keeps nothing.*set window=N"),
    ],
)
def test_bad_specs_explain_the_fix(spec, message):
    with pytest.raises(KVSpecError, match=message):
        policy(spec)


def test_retrieval_stage_is_not_a_compaction_policy():
    with pytest.raises(KVSpecError, match=r"'freekv' is not a compaction policy"):
        parse_stage("freekv:budget=1024", kind="compaction")


def test_fractional_budget_checked_once_context_is_known():
    p = policy("snapkv:budget=0.1")  # fine to build: its size depends on the context
    assert p.budget_tokens(1000) == 100
    with pytest.raises(KVSpecError, match=r"budget=0.1 gives 10 tokens at a context of 100 .*sink\+window = 4\+32 = 36"):
        p.budget_tokens(100)


def test_select_rejects_keep_below_sink_plus_window():
    with pytest.raises(KVSpecError, match=r"select\(keep=5\).*sink\+window = 4\+32 = 36"):
        policy("kvcrush:budget=64").select(np.random.default_rng(0).random((2, 100), dtype=np.float32), 5)
