"""The scheduler: concurrent requests equal to the same requests alone, admission by KV memory,
cancellation, multi-turn reuse and chunked prefill between decode steps (tiny models)."""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest

import kvtrt
from kvtrt import KVMemoryError, QueueFullError

SPECS = ["full", "kvcrush:budget=0.25,base=snapkv,window=4", "h2o:budget=48,window=4",
         "freekv:budget=48,page=8,sink=4,window=8,tau=0.9,min_context=64",
         "kvcrush:budget=0.5,base=snapkv,window=4+freekv:budget=48,page=8,sink=4,window=8,min_context=64"]


def prompts_of(n: int, seed: int = 0) -> list[list[int]]:
    """`n` token-id prompts of 10 to 420 tokens (the tiny model has 512 positions)."""
    rng = random.Random(seed)
    return [[rng.randrange(5, 261) for _ in range(rng.randrange(10, 420))] for _ in range(n)]


def run_threads(work, count: int) -> list:
    out = [None] * count
    errors = []

    def target(i):
        try:
            out[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_sixteen_threads_get_what_they_get_alone(tiny_llama, spec):
    """16 threads submit prompts of 10-420 tokens with different lengths, joining at different
    times: every greedy output is token-identical to the same request run alone (same spec)."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, prefill_chunk=64)
    llm.manifest.eos_token_ids = []
    prompts = prompts_of(16)
    new = [8 + 5 * i for i in range(16)]
    alone = [llm.generate(p, max_new_tokens=n, kv=spec).token_ids for p, n in zip(prompts, new)]
    import time

    def work(i):
        time.sleep(0.003 * i)  # join at different times, some while others prefill or decode
        return llm.submit(prompts[i], max_new_tokens=new[i], kv=spec).result().token_ids

    together = run_threads(work, 16)
    assert together == alone
    assert all(len(t) == n for t, n in zip(together, new))
    stats = llm.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_bytes_used == 0
    llm.close()


def test_one_batch_mixes_specs(tiny_llama):
    """Requests with different KV specs run at once, each equal to itself alone."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, prefill_chunk=64)
    llm.manifest.eos_token_ids = []
    prompts = prompts_of(len(SPECS) * 2, seed=1)
    jobs = [(p, SPECS[i % len(SPECS)]) for i, p in enumerate(prompts)]
    alone = [llm.generate(p, max_new_tokens=24, kv=s).token_ids for p, s in jobs]
    requests = [llm.submit(p, max_new_tokens=24, kv=s) for p, s in jobs]
    assert [r.result().token_ids for r in requests] == alone
    llm.close()


def test_batched_rows_share_calls(tiny_llama, monkeypatch):
    """Concurrent full-cache requests decode in one graph call per step, not one per request."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    llm.manifest.eos_token_ids = []
    calls = []
    run = llm.engine.run
    monkeypatch.setattr(llm.engine, "run", lambda variant, binding, **kw: (calls.append(variant), run(variant, binding, **kw)))
    prompts = prompts_of(4, seed=2)
    requests = [llm.submit(p, max_new_tokens=30) for p in prompts]
    for r in requests:
        r.result()
    decode_calls = sum(1 for c in calls if c.startswith("decode"))
    assert decode_calls < 4 * 29  # 29 decode steps each, run alone would be 116 calls
    llm.close()


def test_rows_keep_their_own_lengths_within_the_admission_bound(tiny_llama, monkeypatch):
    """Rows of different lengths share a batch without being padded to each other: after every step
    each row's live slots are exactly `[0, length)`; a full-cache batch holds no more than the
    largest length + up to 256 steps to come, and a compacting batch never more than the largest
    budget + the compaction slack (its admission bound), however the rows' steps interleave."""
    from kvtrt.runtime.batch import COMPACTION_SLACK, GROW_STEPS, DenseBatch

    _, _, directory = tiny_llama
    seen = {"full": 0, "crush": 0}
    step = DenseBatch.step

    def checked(group):
        out = step(group)
        for i, row in enumerate(group.rows):
            live = np.flatnonzero(group.mask[i]).tolist()
            assert live == list(range(row.length)), "a row's live slots are [0, length)"
        longest = max(r.length for r in group.rows)
        if group.scored:
            assert group.capacity <= max(r.seq.keep for r in group.rows) + COMPACTION_SLACK
            seen["crush"] += 1
        else:
            assert group.capacity <= longest + GROW_STEPS
            seen["full"] += 1
        return out

    monkeypatch.setattr(DenseBatch, "step", checked)
    # compacting rows start below their budget (prompts of at most 60 tokens, budget 100) and grow
    # to budget + slack before their first compaction
    for spec, new, cut in (("full", 40, 280), ("kvcrush:budget=100,base=snapkv,window=4", 3 * COMPACTION_SLACK, 60)):
        llm = kvtrt.load(directory, kv=spec)
        llm.manifest.eos_token_ids = []
        # shortest first, the others join while it decodes (280 + 192 new tokens fit in 512 positions)
        prompts = sorted((p[:cut] for p in prompts_of(4, seed=5)), key=len)
        requests = [llm.submit(prompts[0], max_new_tokens=new)]
        for _ in zip(range(30), requests[0]):  # pieces of its stream: some 30 tokens decoded
            pass
        requests += [llm.submit(p, max_new_tokens=new - 7 * i) for i, p in enumerate(prompts[1:])]
        for r in requests:
            r.result()
        llm.close()
    assert seen["full"] > 0 and seen["crush"] > 0


def test_stream_pieces_and_async_stream(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    expected = llm.generate("The quick brown fox", max_new_tokens=20).text
    request = llm.submit("The quick brown fox", max_new_tokens=20)
    assert "".join(request) == expected == request.result().text

    async def collect():
        return "".join([piece async for piece in llm.submit("The quick brown fox", max_new_tokens=20).astream()])

    assert asyncio.run(collect()) == expected
    llm.close()


def test_finish_reasons(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    assert llm.generate("Hello", max_new_tokens=5).finish_reason in ("length", "stop")
    llm.manifest.eos_token_ids = []
    assert llm.generate("Hello", max_new_tokens=5).finish_reason == "length"
    first = llm.generate("Hello", max_new_tokens=1).token_ids[0]
    llm.manifest.eos_token_ids = [first]
    result = llm.generate("Hello", max_new_tokens=5)
    assert result.finish_reason == "stop" and result.token_ids == []
    llm.close()


def full_cache_bytes(llm, tokens: int) -> int:
    return tokens * llm.manifest.kv_bytes_per_token


def submit_together(llm, prompt, count: int, **options):
    """`count` requests queued before the scheduler looks at any (it waits on the lock we hold), so
    the first cannot finish before the last is submitted on a fast host."""
    with llm.scheduler._lock:
        return [llm.submit(prompt, **options) for _ in range(count)]


def test_admission_waits_for_memory_and_compaction_admits_more(tiny_llama):
    """A cap that fits two full-cache requests: the third waits and starts after one ends; the
    same cap runs four kvcrush:budget=0.1 requests at once."""
    _, _, directory = tiny_llama
    prompt, new = [random.Random(3).randrange(5, 261) for _ in range(200)], 8
    probe = kvtrt.load(directory)
    assert probe.request_bytes(prompt, new) == full_cache_bytes(probe, 200 + new) + full_cache_bytes(probe, 200)
    # two rows of (200 + 8 steps + 8 to come) and one prefill of 200; three rows never fit
    cap = 2 * full_cache_bytes(probe, 216) + full_cache_bytes(probe, 200)
    llm = kvtrt.load(directory, kv_memory=cap)
    llm.manifest.eos_token_ids = []
    requests = submit_together(llm, prompt, 3, max_new_tokens=new)
    stats = [r.result().stats for r in requests]
    first_end = min(s.finished_at for s in stats[:2])
    assert stats[2].admitted_at >= first_end  # the third started only after one of the first two ended
    assert stats[1].admitted_at < stats[0].finished_at  # the first two ran together
    assert llm.stats().kv_bytes_used == 0
    llm.close()

    crush = kvtrt.load(directory, kv_memory=cap, kv="kvcrush:budget=0.1,base=snapkv,window=4")
    crush.manifest.eos_token_ids = []
    requests = submit_together(crush, prompt, 4, max_new_tokens=new)
    stats = [r.result().stats for r in requests]
    last_admitted = max(s.admitted_at for s in stats)
    assert all(last_admitted < s.finished_at for s in stats)  # all four held their KV at once
    crush.close()


def test_oversized_request_and_full_queue_fail_clearly(tiny_llama):
    _, _, directory = tiny_llama
    probe = kvtrt.load(directory)
    prompt = [9] * 100
    need = probe.request_bytes(prompt, 16)
    llm = kvtrt.load(directory, kv_memory=need - 1, max_queue=1)
    with pytest.raises(KVMemoryError, match="kv_memory.*kvcrush"):
        llm.submit(prompt, max_new_tokens=16)
    small = [9] * 40
    llm.manifest.eos_token_ids = []
    running = llm.submit(small, max_new_tokens=120)  # holds most of the cap
    next(iter(running))
    waiting = llm.submit(prompt[:60], max_new_tokens=16)  # does not fit beside it: waits
    with pytest.raises(QueueFullError, match="max_queue=1"):
        llm.submit(prompt[:60], max_new_tokens=16)
    running.cancel()
    assert running.result().finish_reason == "cancelled"
    assert waiting.result().finish_reason == "length"
    with pytest.raises(kvtrt.PromptTooLongError, match="positions"):
        llm.submit([9] * 600, max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown KV policy"):
        llm.submit("hi", kv="lru:budget=3")
    llm.close()


def test_cancel_mid_stream_frees_kv(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    llm.manifest.eos_token_ids = []
    request = llm.submit(prompts_of(1, seed=4)[0][:60], max_new_tokens=400)
    pieces = iter(request)
    next(pieces)
    assert llm.stats().kv_bytes_used > 0
    request.cancel()
    result = request.result()
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 400
    assert llm.stats().kv_bytes_used == 0 and llm.stats().running == 0
    llm.close()


def test_thousand_short_requests_leave_nothing_behind(tiny_llama):
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, kv_memory="64MiB")

    def work(i):
        rng = random.Random(i)
        out = []
        for j in range(125):
            ids = [rng.randrange(5, 261) for _ in range(rng.randrange(3, 20))]
            out.append(llm.submit(ids, max_new_tokens=rng.randrange(1, 4)).result())
        return out

    results = run_threads(work, 8)
    assert sum(len(r) for r in results) == 1000
    stats = llm.stats()
    assert stats.requests_finished_total == 1000
    assert stats.kv_bytes_used == 0 and stats.running == 0 and stats.waiting == 0 and stats.prefilling == 0
    assert stats.cached_prefix_bytes <= 64 * 2**20
    assert not any(group.rows for group in llm.scheduler.groups)
    llm.close()


@pytest.mark.parametrize("spec", ["full", "kvcrush:budget=0.5,base=snapkv,window=4"])
def test_next_turn_reuses_the_conversation(tiny_llama, spec):
    """A chat's next turn prefills only what is new; for the full cache it gives the tokens of
    prefilling the whole conversation."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, kv=spec)
    fresh = kvtrt.load(directory, kv=spec, prefix_cache=0)
    for model in (llm, fresh):
        model.manifest.eos_token_ids = []
    first = llm.generate([{"role": "user", "content": "Tell me about the sea and its many colours."}],
                         max_new_tokens=24)
    # the next turn as ids (the random model's bytes do not survive a text round trip)
    turn = llm.codec.encode_chat([{"role": "user", "content": "And the sky?"}])
    conversation = first.prompt_ids + first.token_ids + turn
    second = llm.generate(conversation, max_new_tokens=24)
    baseline = fresh.generate(conversation, max_new_tokens=24)
    assert second.stats.reused_prefix_tokens > len(first.prompt_ids)
    assert baseline.stats.reused_prefix_tokens == 0
    assert llm.stats().reused_prefix_tokens_total == second.stats.reused_prefix_tokens
    if spec == "full":
        assert second.token_ids == baseline.token_ids
    llm.close()
    fresh.close()


def test_running_stream_continues_while_a_long_prompt_prefills(tiny_llama):
    """Chunked prefill between decode steps: a stream receives tokens while a 400-token prompt is
    prefilled in 16-token chunks (order of timestamps, no timing threshold)."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, prefill_chunk=16)
    llm.manifest.eos_token_ids = []
    running = llm.submit([11] * 20, max_new_tokens=200)
    next(iter(running))
    long = llm.submit(prompts_of(1, seed=5)[0][:10] + [13] * 390, max_new_tokens=2).result()
    times = running.result().stats.token_times
    during = [t for t in times if long.stats.admitted_at < t < long.stats.token_times[0]]
    assert len(during) >= 10  # 25 chunks, one decode step between each
    llm.close()


@pytest.mark.slow
def test_smollm2_concurrent_requests_equal_alone(smollm2):
    """The real model: 12 requests with prompts of 10 to 3000 haystack tokens submitted by 12
    threads at once decode the same greedy tokens as each request alone (full cache)."""
    from conftest import haystack_text

    _, _, directory = smollm2
    llm = kvtrt.load(directory, threads=2)
    ids = llm.encode(haystack_text(20000))
    lengths = [10, 3000, 40, 700, 1500, 90, 2400, 300, 1100, 20, 1900, 500]
    prompts = [ids[i * 7:i * 7 + n] for i, n in enumerate(lengths)]
    new = [4 + (i % 5) * 3 for i in range(len(prompts))]
    alone = [llm.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(prompts, new)]
    together = run_threads(lambda i: llm.submit(prompts[i], max_new_tokens=new[i], ignore_eos=True).result().token_ids,
                           len(prompts))
    assert together == alone
    llm.close()


def test_an_llm_nobody_holds_is_freed(tiny_llama, monkeypatch):
    """The scheduler thread ends when idle, so it does not keep a dropped LLM (and its engine,
    weights and KV) alive; the next request starts a new thread."""
    import gc
    import time
    import weakref

    from kvtrt.runtime import scheduler

    monkeypatch.setattr(scheduler, "IDLE_EXIT_S", 0.05)
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory)
    first = llm.generate("hello", max_new_tokens=3).token_ids
    time.sleep(0.3)
    assert llm.generate("hello", max_new_tokens=3).token_ids == first  # a new thread serves it
    ref = weakref.ref(llm)
    del llm
    for _ in range(50):
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.05)
    assert ref() is None


def test_load_leaves_the_process_torch_threads_alone(tiny_llama):
    """`torch_threads` applies to the KV manager's own threads, not to the caller's."""
    import torch

    _, _, directory = tiny_llama
    before = torch.get_num_threads()
    llm = kvtrt.load(directory, torch_threads=1, kv="freekv:budget=48,page=8,sink=4,window=8,min_context=0")
    llm.generate(prompts_of(1, seed=6)[0][:120], max_new_tokens=8)
    assert torch.get_num_threads() == before
    llm.close()


def test_a_request_whose_prefill_cannot_start_fails_alone(tiny_llama, monkeypatch):
    """An error while a request's prefill is set up (here: its store cannot be allocated) fails that
    request with the error; the scheduler's loop goes on and serves the next request."""
    from kvtrt.runtime import scheduler as scheduler_module

    llm = kvtrt.load(tiny_llama[2])
    prompts = prompts_of(2, seed=5)
    expected = llm.generate(prompts[1], max_new_tokens=6).token_ids
    real = scheduler_module.PrefillJob

    def failing(engine, ids, *args, **kwargs):
        if ids == prompts[0]:
            raise MemoryError("no room for this prompt's KV")
        return real(engine, ids, *args, **kwargs)

    monkeypatch.setattr(scheduler_module, "PrefillJob", failing)
    bad = llm.submit(prompts[0], max_new_tokens=6)
    with pytest.raises(MemoryError, match="no room"):
        bad.result(timeout=60)
    assert llm.generate(prompts[1], max_new_tokens=6).token_ids == expected
    assert llm.stats().running == 0 and llm.stats().kv_bytes_used == 0
    llm.close()



def test_a_fault_of_the_loop_itself_fails_the_requests_in_flight(tiny_llama, monkeypatch):
    """An error outside any one request's work (here: publishing the gauges) stops the loop; every
    request in flight (decoding, prefilling, waiting) fails with it at once instead of waiting forever,
    their KV is freed, and the next request starts a new loop."""
    from kvtrt.runtime.scheduler import Scheduler

    llm = kvtrt.load(tiny_llama[2], kv_memory=full_cache_bytes(kvtrt.load(tiny_llama[2]), 900))
    prompts = prompts_of(3, seed=8)
    expected = llm.generate(prompts[0], max_new_tokens=5).token_ids
    real, calls = Scheduler._publish, []

    def publish(self):
        calls.append(1)
        if len(calls) == 3:  # the third iteration: the first request decodes, the others queue behind it
            raise RuntimeError("gauges broke")
        return real(self)

    monkeypatch.setattr(Scheduler, "_publish", publish)
    requests = [llm.submit(p, max_new_tokens=200, min_new_tokens=200) for p in prompts]
    for request in requests:
        with pytest.raises(RuntimeError, match="internal error of kvtrt's scheduler.*gauges broke"):
            request.result(timeout=60)
    assert llm.stats().running == 0 and llm.stats().kv_bytes_used == 0
    assert llm.generate(prompts[0], max_new_tokens=5).token_ids == expected
    llm.close()

def test_admission_counts_buffers_a_longer_row_left_behind(tiny_llama):
    """A batch keeps its buffers' length when its longest row leaves; rows joining later fill them.
    Admission must count those slots, not only what the rows now need: the KV held (sampled after
    every decode step) never passes kv_memory."""
    _, _, directory = tiny_llama
    probe = kvtrt.load(directory)
    cap = full_cache_bytes(probe, 2000)
    llm = kvtrt.load(directory, kv_memory=cap)
    llm.manifest.eos_token_ids = []
    held = []
    step = llm.scheduler.dense.step

    def recording_step():
        out = step()
        held.append(llm.scheduler.used_bytes())
        return out

    llm.scheduler.dense.step = recording_step
    with llm.scheduler._lock:  # a long row (460 slots) and a short one (160) run together
        long = llm.submit([9] * 400, max_new_tokens=60)
        short = llm.submit([9] * 10, max_new_tokens=150)
    long.result()
    later = [llm.submit([9] * 10, max_new_tokens=100) for _ in range(4)]  # each needs 110 slots
    stats = [r.result().stats for r in (short, *later)]
    assert stats[1].admitted_at < stats[0].finished_at  # joined the short row's batch
    # five rows of 460 slots (2300 tokens' worth) would pass the cap; counted by what the rows need
    # (160 + 4 x 110) they seemed to fit, and did run at once before the fix
    assert max(held) <= cap
    assert llm.stats().kv_bytes_used == 0
    llm.close()


def test_a_request_is_sized_alone_whatever_buffers_are_left_behind(tiny_llama):
    """`request_bytes` (and the refusal at `submit`) count a request alone, not inside the running
    batch's buffers: a row of 460 slots that has left must not make a smaller request look too big."""
    _, _, directory = tiny_llama
    probe = kvtrt.load(directory)
    llm = kvtrt.load(directory, kv_memory=full_cache_bytes(probe, 2000))
    llm.manifest.eos_token_ids = []
    with llm.scheduler._lock:  # a long row (460 slots) and a short one that outlives it
        long = llm.submit([9] * 400, max_new_tokens=60)
        short = llm.submit([9] * 10, max_new_tokens=480)
    long.result()
    with llm.scheduler._lock:
        assert not short.done and llm.scheduler.dense.capacity > 400  # the long row's buffers remain
        assert llm.request_bytes([9] * 100, 300) == probe.request_bytes([9] * 100, 300)
    short.cancel()
    llm.close()
    probe.close()
