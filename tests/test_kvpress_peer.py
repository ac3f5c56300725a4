"""kvtrt's compaction policies against kvpress's presses on the tiny Llama (`kvtrt eval --peer kvpress`).

SnapKV, exactly what agrees and what is documented to differ (kvpress 0.5.5 `SnapKVPress` against
kvtrt `snapkv`):

- Agrees (tested: same kept tokens per layer and KV head): the observation window is the last
  `window` prompt queries; each query head's softmax attention over the whole prompt (the window
  causal), averaged over the window queries, restricted to the keys before the window, 1-D average
  pooling of width `kernel` (stride 1, zero padding counted); per KV group the mean over its query
  heads (kvtrt's graph averages per group before pooling, kvpress after: both are linear, so the
  scores are equal up to a constant); the window's own tokens are always kept; the rest is the top
  scores, one choice per KV head.
- Differs by default: kvtrt keeps `sink=4` first tokens whatever their score, kvpress keeps none
  (set `sink=0` to match); kvpress's default window is 64, kvtrt's 32 (its exports score the last
  `score_window` = 32 queries; `--peer kvpress` builds the press with kvtrt's window and kernel);
  kvpress keeps `int(n * (1 - compression_ratio))` tokens (`1 - 0.1` gives 409 of 4096, kvtrt's
  `round(0.1 * 4096)` 410: `kvpress_ratio` picks the ratio that keeps kvtrt's count); kvpress
  compresses only the prefill and the cache then grows by every decoded token, while kvtrt
  re-compacts a decoding sequence to its budget whenever it outgrows it by 64 tokens (H2O-style
  decode scores), so over a 256-token continuation kvpress holds up to 256 more tokens.
- H2O: kvpress's `ObservedAttentionPress` scores a key by the mean attention it gets from every
  prompt query; kvtrt's `h2o` scores the prompt from the same last `score_window` queries as SnapKV
  (no pooling), keeps sink and window, and accumulates decode attention afterwards.
- StreamingLLM: `StreamingLLMPress(n_sink=4)` keeps exactly kvtrt's `streaming` tokens (tested).
- KVCrush: kvpress 0.5.5 has no KVCrush press.
"""

from __future__ import annotations

import pytest
import torch

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (pip install --no-deps kvpress, then "
                                                "cachetools, fire, datasets: see kvtrt.eval.peers.KVPRESS_INSTALL)")

from kvtrt import load  # noqa: E402
from kvtrt.eval.decoding import prefill  # noqa: E402
from kvtrt.eval.peers import KVPressPeer, kvpress_press, kvpress_ratio  # noqa: E402
from kvtrt.runtime.kv.spec import parse_kv_spec  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, _, directory = tiny_llama
    llm = load(directory, threads=1, prefix_cache=0)
    peer = KVPressPeer("unused", hf=(model, None))
    torch.manual_seed(3)
    ids = torch.randint(5, 261, (240,)).tolist()
    start = prefill(llm, ids)
    return llm, peer, ids, start


def kept_slots(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """Per KV head, the sorted positions of `kept` rows [1,Hkv,K,D] in `full` [1,Hkv,N,D] (exact copies)."""
    out = []
    for h in range(full.shape[1]):
        match = (kept[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # [K, N]
        assert bool((match.sum(1) == 1).all()), "a kept key is not a unique copy of a prompt key"
        out.append(sorted(match.float().argmax(1).tolist()))
    return out


def kvtrt_slots(llm, start, spec: str, keep: int) -> list[list[list[int]]]:
    policy = parse_kv_spec(spec).compaction
    n = len(start.ids)
    return [policy.select(start.store.grouped_scores(layer)[..., :n], keep).tolist() for layer in range(llm.manifest.n_layers)]


def kvpress_slots(peer, ids, press) -> list[list[list[int]]]:
    _, kept = peer._prefill(ids, {"press": press})
    return [kept_slots(full_k, press_k) for (full_k, _), (press_k, _) in zip(kept["full"], kept["press"])]


@pytest.mark.parametrize("keep", [40, 96, 160])
def test_snapkv_keeps_the_same_tokens_as_snapkv_press(tiny, keep):
    llm, peer, ids, start = tiny
    window = llm.manifest.score_window  # the tiny export scores the last 4 queries
    spec = f"snapkv:budget={keep},sink=0,window={window},kernel=5"
    press = kvpress_press(parse_kv_spec(spec).compaction, keep, len(ids))
    assert isinstance(press, kvpress.SnapKVPress) and press.window_size == window and press.kernel_size == 5
    assert kvtrt_slots(llm, start, spec, keep) == kvpress_slots(peer, ids, press)


def test_snapkv_default_sink_is_the_documented_difference(tiny):
    """kvtrt's default keeps the first 4 tokens whatever their score; everything else is the same
    ranking, so kvtrt(sink=4) = first 4 + the top of kvpress's ranking that is not among them."""
    llm, peer, ids, start = tiny
    window, keep = llm.manifest.score_window, 60
    with_sink = kvtrt_slots(llm, start, f"snapkv:budget={keep},sink=4,window={window},kernel=5", keep)
    # kvpress at every larger budget: its kept set grows along its ranking, so the first budget whose
    # kept set (minus the sink) reaches keep - 4 - window prefix tokens gives the same tokens
    for layer, heads in enumerate(with_sink):
        for head, slots in enumerate(heads):
            assert slots[:4] == [0, 1, 2, 3]
            for k in range(keep - 4, len(ids)):
                ranked = kvpress_slots(peer, ids, kvpress.SnapKVPress(compression_ratio=kvpress_ratio(k, len(ids)),
                                                                      window_size=window, kernel_size=5))
                rest = [s for s in ranked[layer][head] if s >= 4]
                if len(rest) >= keep - 4:
                    break
            assert [0, 1, 2, 3] + rest == slots


def test_streaming_keeps_the_same_tokens_as_streaming_press(tiny):
    llm, peer, ids, start = tiny
    keep = 64
    spec = f"streaming:budget={keep},sink=4"
    press = kvpress_press(parse_kv_spec(spec).compaction, keep, len(ids))
    assert isinstance(press, kvpress.StreamingLLMPress)
    assert kvtrt_slots(llm, start, spec, keep) == kvpress_slots(peer, ids, press)


def test_h2o_maps_to_observed_attention_and_kvcrush_to_nothing(tiny):
    _, _, ids, _ = tiny
    h2o = kvpress_press(parse_kv_spec("h2o:budget=64").compaction, 64, len(ids))
    assert isinstance(h2o, kvpress.ObservedAttentionPress)
    crush = kvpress_press(parse_kv_spec("kvcrush:budget=64").compaction, 64, len(ids))
    assert crush is None or type(crush).__name__ == "KVCrushPress"
    for spec in ("snapkv:budget=64,block=8", "h2o:budget=64,block=8"):  # kvpress selects tokens, not blocks
        assert kvpress_press(parse_kv_spec(spec).compaction, 64, len(ids)) is None


def test_adakv_maps_to_adakv_press_over_its_base(tiny):
    _, _, ids, _ = tiny
    press = kvpress_press(parse_kv_spec("adakv:budget=64,kernel=5,floor=0.3").compaction, 64, len(ids))
    assert isinstance(press, kvpress.AdaKVPress) and press.alpha_safeguard == 0.3
    assert isinstance(press.press, kvpress.SnapKVPress) and press.press.kernel_size == 5
    assert press.press.compression_ratio == kvpress_ratio(64, len(ids))


def test_head_masking_presses_keep_their_masks_per_press(tiny):
    """AdaKVPress keeps the whole cache and leaves the keys to mask on the attention modules, where kvpress's
    attention patch reads them while decoding. Run beside other presses in one prefill (as `kvtrt eval
    --peer kvpress` runs a text's presses), each continuation must get its own press's masks: the full cache
    none, AdaKV its own (once the last press's masks leaked into every label, AdaKV's included)."""
    _, peer, ids, _ = tiny
    prompt, targets = ids[:200], ids[200:203]  # (kvpress fakes a key no query attends: few queries here)
    ada = kvpress.AdaKVPress(press=kvpress.SnapKVPress(compression_ratio=kvpress_ratio(50, 200), window_size=16,
                                                       kernel_size=5))
    snap = kvpress.SnapKVPress(compression_ratio=kvpress_ratio(100, 200), window_size=16, kernel_size=5)
    together = peer.run(prompt, {"ada": ada, "snap": snap}, targets=targets)
    full = peer.run(prompt, {}, targets=targets)["full"]
    alone = {label: peer.run(prompt, {label: press}, targets=targets)[label] for label, press in
             (("ada", ada), ("snap", snap))}
    assert together["full"] == pytest.approx(full, rel=1e-9)
    assert together["ada"] == pytest.approx(alone["ada"], rel=1e-9)
    assert together["snap"] == pytest.approx(alone["snap"], rel=1e-9)
    assert abs(together["ada"] - full) > 1e-3  # its masks did apply


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_kvpress_ratio_keeps_kvtrts_token_count(fraction):
    from kvpress.utils import compute_n_kept

    for n in (1000, 4096, 7680):
        keep = parse_kv_spec(f"snapkv:budget={fraction}").compaction.budget_tokens(n)
        assert compute_n_kept(n, kvpress_ratio(keep, n)) == keep


def test_peer_protocol_full_cache_is_hf_teacher_forcing(tiny):
    """The peer's prefill + continuation on the uncompressed cache scores exactly what one HF forward
    over prompt + targets scores; a press changes the continuation's score, not the prefill's."""
    _, peer, ids, _ = tiny
    prompt, targets = ids[:200], ids[200:]
    with torch.inference_mode():
        logits = peer.model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:-1].double()
    expected = -float(logits.log_softmax(-1).gather(1, torch.tensor(targets)[:, None]).sum())
    press = kvpress.SnapKVPress(compression_ratio=kvpress_ratio(50, len(prompt)), window_size=4)
    out = peer.run(prompt, {"snapkv": press}, targets=targets)
    assert out["full"] == pytest.approx(expected, rel=1e-5)
    assert out["snapkv"] != pytest.approx(expected, rel=1e-5)
    greedy = peer.run(prompt, {"snapkv": press}, new_tokens=6)
    assert len(greedy["full"]) == len(greedy["snapkv"]) == 6 and greedy["full"][0] == greedy["snapkv"][0]


def test_peer_continuation_on_a_compressed_cache_is_causal(tiny):
    """Scoring the continuation in one forward on a compressed cache (mask from the cache's length,
    RoPE from the explicit positions) equals feeding it one token at a time: no look-ahead."""
    _, peer, ids, _ = tiny
    prompt, targets = ids[:200], ids[200:230]
    press = kvpress.SnapKVPress(compression_ratio=kvpress_ratio(60, len(prompt)), window_size=4)
    nll = peer.run(prompt, {"snapkv": press}, targets=targets)["snapkv"]
    last, kept = peer._prefill(prompt, {"snapkv": press})
    cache = peer._cache(kept["snapkv"])
    logits = [last]
    with torch.inference_mode():
        for i, token in enumerate(targets[:-1]):
            out = peer.model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[len(prompt) + i]]),
                             **{peer._cache_kw: cache})
            logits.append(out.logits[0, -1])
    logp = torch.stack(logits).double().log_softmax(-1)
    assert nll == pytest.approx(-float(logp.gather(1, torch.tensor(targets)[:, None]).sum()), rel=1e-5)
