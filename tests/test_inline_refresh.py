"""`select=inline` (FreeKV / Quest refreshed inside kvtrt's decode attention op): before each layer
attends, the op re-selects the pages of the KV heads whose query moved, with the query that layer has
just computed, in the step's one graph call. The same pages, counters and tokens as the decode-groups
path with one group per layer (`select=fresh`), which runs a graph call per layer to get there.

The suite forces the kernel (`tests/conftest.py`), so `select=auto` is inline here as well."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kvtrt
from kvtrt.runtime.cpu_kernels import page_ops
from kvtrt.runtime.kv.freekv import FreeKVRetrieval
from kvtrt.runtime.kv.options import KVSpecError
from kvtrt.runtime.kv.spec import parse_kv_spec
from tiny import random_prompt, tiny_model, tiny_tokenizer

SPEC = "page=8,sink=4,window=8,min_context=0"
COUNTERS = ("heads_checked", "heads_corrected", "pages_selected", "pages_hit", "pages_recalled", "tokens_copied")


@pytest.fixture(scope="module")
def per_layer_groups(tmp_path_factory):
    """A 4-layer llama exported with one decode group per layer (the grouped path's exact case)."""
    from kvtrt.export import export_model

    directory = tmp_path_factory.mktemp("inline-groups")
    export_model((tiny_model("llama", num_hidden_layers=4), tiny_tokenizer()), directory, progress=False,
                 score_window=4, decode_groups=4)
    return directory


@pytest.mark.parametrize("spec", [f"quest:budget=48,{SPEC}", f"freekv:budget=48,{SPEC},tau=0.9",
                                  f"freekv:budget=48,{SPEC},tau=0.3", f"freekv:budget=48,{SPEC},tau=0.6,drift=min",
                                  f"freekv:budget=48,{SPEC},tau=0.3,combine=mean,pool_dtype=fp32",
                                  f"freekv:budget=64,page=4,sink=4,window=8,min_context=0,tau=0"])
def test_inline_equals_one_decode_group_per_layer(per_layer_groups, spec):
    """Tokens and every retrieval counter equal the grouped path's (each layer's pages chosen with its
    own query there too, by a graph call per layer), with one view and one graph call a step."""
    llm = kvtrt.load(per_layer_groups, torch_threads=1)
    llm.manifest.eos_token_ids = []
    prompt = random_prompt(300, seed=4)
    if spec.startswith("freekv"):
        spec += ",cover=0"  # the fresh path has no cover test (inline's default)
    inline = llm.generate(prompt, max_new_tokens=20, kv=f"{spec},select=inline")
    grouped = llm.generate(prompt, max_new_tokens=20, kv=f"{spec},select=fresh")
    assert inline.stats.kv["retrieval_engaged"] == 1 and inline.stats.kv["decode_groups"] == 0
    assert grouped.stats.kv["decode_groups"] == 4
    assert inline.token_ids == grouped.token_ids
    assert {k: inline.stats.kv[k] for k in COUNTERS} == {k: grouped.stats.kv[k] for k in COUNTERS}
    assert inline.stats.kv["view_bytes"] == grouped.stats.kv["view_bytes"]  # one view each
    assert inline.stats.kv["heads_corrected"] > 0  # (tau=0 too: every head re-selects when a page joins the pool)
    llm.close()


@pytest.mark.parametrize("mode", ["quest", "freekv:tau=1", "freekv:tau=0.1,cover=0", "freekv:tau=0.1,cover=1",
                                  "freekv:tau=0,cover=1"])
def test_each_layer_attends_pages_chosen_with_its_own_query(tiny_llama, monkeypatch, mode):
    """After each step, every corrected KV head holds exactly a fresh top-k with the query its layer
    computed in that step, and every other head holds what it held before the step (quest, tau=1:
    every head, every step). With the cover test (inline's default, or cover=N) the corrected heads are exactly
    those whose group-mean cosine is below tau or that miss one of their query heads' N best pages (the C
    cover test on the pages held before the step), and a page leaving the window does not re-select every
    head."""
    name, _, extra = mode.partition(":")
    spec = f"{name}:budget=48,{SPEC},select=inline" + (f",{extra}" if extra else "")
    checked, misses = [], []
    finish, arm = FreeKVRetrieval.finish_step, FreeKVRetrieval.inline_refresh
    before = {}

    def arming(self):
        before["pages"] = self.view().slot_pages.copy()
        before["basis"] = self._basis[0].copy()
        return arm(self)

    def checking_finish(self, query, new_keys, new_values):
        view, query, g = self.view(), np.stack([np.asarray(q) for q in query]), self.n_heads // self.n_kv_heads
        moved = ~np.all(self._basis[0] == before["basis"], axis=-1)  # [L, 1, H]: heads whose basis was replaced
        moved = moved.reshape(self.n_layers, 1, self.n_kv_heads, -1)
        assert (moved.all(-1) == moved.any(-1)).all()  # a KV head's query heads move together
        for layer in range(self.n_layers):
            fresh = np.sort(self.fresh_selection(layer, query[layer], view), -1)
            held = np.sort(view.slot_pages[layer], -1)
            for h in range(self.n_kv_heads):
                if moved[layer, 0, h].all():
                    assert np.array_equal(held[0, h], fresh[0, h]), (len(checked), layer, h)
                    assert np.array_equal(self._basis[0][layer, 0, h * g:(h + 1) * g], query[layer, 0, h * g:(h + 1) * g])
                else:
                    assert np.array_equal(view.slot_pages[layer, 0, h], before["pages"][layer, 0, h])
        tau, cover = self.config.correction(inline=True)
        if cover:
            after = view.slot_pages.copy()
            view.slot_pages[...] = before["pages"]
            ctx, _ = self._inline_context(view)
            missed = np.stack([page_ops.cover_test(ctx, layer, query[layer, 0]) for layer in range(self.n_layers)])
            view.slot_pages[...] = after
            unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
            cos = (unit(query[:, 0]) * unit(before["basis"][:, 0])).sum(-1).reshape(self.n_layers, self.n_kv_heads, g)
            drifted = (cos.mean(-1) < tau) & (tau > 0)  # tau=0 never corrects by the cosine
            assert np.array_equal(moved[:, 0].all(-1), missed | drifted), (len(checked), missed, drifted)
            misses.append(int(missed.sum()))
        checked.append(int(moved.any(-1).sum()))
        return finish(self, query, new_keys, new_values)

    monkeypatch.setattr(FreeKVRetrieval, "inline_refresh", arming)
    monkeypatch.setattr(FreeKVRetrieval, "finish_step", checking_finish)
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    result = llm.generate(random_prompt(200), max_new_tokens=12, kv=spec)
    stats = result.stats.kv
    assert stats["retrieval_engaged"] == 1 and len(checked) == 11 and stats["decode_groups"] == 0
    assert sum(checked) == stats["heads_corrected"]
    if name == "quest" or extra == "tau=1":
        assert stats["heads_checked"] == stats["heads_corrected"] == 11 * 2 * 2
    else:
        assert 0 < stats["heads_corrected"] < stats["heads_checked"]
    if name == "freekv" and "cover=0" not in extra and extra != "tau=1":  # the cover test (inline's default)
        # corrected heads the cosine kept
        assert sum(misses) > 0
    llm.close()


@pytest.mark.parametrize("spec", [f"quest:budget=600,{SPEC},select=inline",
                                  f"freekv:budget=600,{SPEC},tau=0.9,select=inline",
                                  f"freekv:budget=600,{SPEC},tau=0.9,pool_dtype=fp16,select=inline"])
def test_covering_budget_matches_the_full_cache(tiny_llama, spec):
    """A budget that holds every token attends to all of them: the full cache's tokens (fp16 pool:
    covering budgets recall every page, widened exactly)."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    prompt = random_prompt(220, seed=1)
    full = llm.generate(prompt, max_new_tokens=24, kv="full").token_ids
    got = llm.generate(prompt, max_new_tokens=24, kv=spec)
    assert got.stats.kv["retrieval_engaged"] == 1 and got.stats.kv["pages_recalled"] > 0
    if "fp16" not in spec:
        assert got.token_ids == full
    llm.close()


def test_inline_rows_decode_concurrently_as_alone(tiny_llama):
    """Inline rows beside previous, speculative and full-cache rows, submitted from four threads: each
    gets what it gets alone (the op finds each row's view by its buffer; the others' calls pass through)."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    specs = [f"freekv:budget=48,{SPEC},tau=0.9,select=inline", f"quest:budget=48,{SPEC},select=inline",
             f"freekv:budget=48,{SPEC},tau=0.9,select=previous", "full", f"freekv:budget=48,{SPEC},tau=0.8",
             f"quest:budget=48,{SPEC},select=speculative"]
    prompts = [random_prompt(120 + 40 * i, seed=20 + i) for i in range(len(specs))]
    alone = [llm.generate(p, max_new_tokens=10 + 3 * i, kv=s).token_ids for i, (p, s) in enumerate(zip(prompts, specs))]
    with ThreadPoolExecutor(4) as pool:
        requests = list(pool.map(lambda i: llm.submit(prompts[i], max_new_tokens=10 + 3 * i, kv=specs[i]),
                                 range(len(specs))))
    assert [r.result().token_ids for r in requests] == alone
    # admission: one view for inline rows (as previous), two for speculative ones
    one, two = (llm.request_bytes(prompts[0], max_new_tokens=10, kv=s) for s in (specs[0], specs[0].replace(
        "select=inline", "select=speculative")))
    view = parse_kv_spec(specs[0]).retrieval.slots(len(prompts[0])) + 1
    assert two - one == view * llm.manifest.kv_bytes_per_token
    llm.close()


def test_auto_takes_inline_where_the_op_runs_and_explicit_inline_is_refused_elsewhere(tiny_llama):
    """auto: inline with kvtrt's op (the suite forces it), previous without it; an explicit
    select=inline on an engine without the op, or with an int8 pool, is refused naming the fix."""
    _, _, directory = tiny_llama
    prompt = random_prompt(200, seed=5)
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    assert llm.engine.refreshes_inline
    auto = llm.generate(prompt, max_new_tokens=8, kv=f"freekv:budget=48,{SPEC}")
    inline = llm.generate(prompt, max_new_tokens=8, kv=f"freekv:budget=48,{SPEC},select=inline")
    assert auto.token_ids == inline.token_ids
    assert {k: auto.stats.kv[k] for k in COUNTERS} == {k: inline.stats.kv[k] for k in COUNTERS}
    with pytest.raises(KVSpecError, match="pool_dtype=int8; use pool_dtype=fp16 or select=previous"):
        llm.submit(prompt, max_new_tokens=4, kv=f"freekv:budget=48,{SPEC},pool_dtype=int8,select=inline")
    for other in ("select=previous", "select=speculative", "pool_dtype=int8"):  # cover= runs inside the op only
        with pytest.raises(KVSpecError, match="cover=2 tests each head's best pages inside kvtrt's decode attention "
                                              "op.*use select=auto with pool_dtype=fp16 or fp32"):
            llm.submit(prompt, max_new_tokens=4, kv=f"freekv:budget=48,{SPEC},cover=2,{other}")
    int8_auto = llm.generate(prompt, max_new_tokens=8, kv=f"freekv:budget=48,{SPEC},pool_dtype=int8")
    int8_previous = llm.generate(prompt, max_new_tokens=8, kv=f"freekv:budget=48,{SPEC},pool_dtype=int8,select=previous")
    assert int8_auto.token_ids == int8_previous.token_ids  # auto falls back to previous for int8 pools
    llm.close()
    plain = kvtrt.load(directory, torch_threads=1, decode_kernel=False)
    assert not plain.engine.refreshes_inline
    with pytest.raises(KVSpecError, match="select=inline re-selects pages inside kvtrt's decode attention op.*"
                                          "use select=auto"):
        plain.submit(prompt, max_new_tokens=4, kv=f"freekv:budget=48,{SPEC},select=inline")
    with pytest.raises(KVSpecError, match="cover=2 .*an engine without that op"):
        plain.submit(prompt, max_new_tokens=4, kv=f"freekv:budget=48,{SPEC},cover=2")
    previous = plain.generate(prompt, max_new_tokens=8, kv=f"freekv:budget=48,{SPEC},tau=0.9,select=previous")
    assert plain.generate(prompt, max_new_tokens=8, kv=f"freekv:budget=48,{SPEC},tau=0.9").token_ids == \
        previous.token_ids
    plain.close()


def test_correction_defaults_run_the_cover_test_where_the_inline_refresh_runs():
    """FreeKV's defaults: the cover test with 4 pages beside a cosine at 0.7 on the inline path, FreeKV's cosine
    at 0.9 alone elsewhere; given values are kept; quest always re-selects."""
    from kvtrt.runtime.kv.retrieval import COVER, TAU, TAU_WITH_COVER

    freekv = lambda text: parse_kv_spec(f"freekv:budget=1024,{text}".rstrip(",")).retrieval
    assert (TAU, TAU_WITH_COVER, COVER) == (0.9, 0.7, 4)
    assert freekv("").correction(inline=True) == (0.7, 4) and freekv("").correction(inline=False) == (0.9, 0)
    assert freekv("tau=0.8").correction(inline=True) == (0.8, 4) and freekv("cover=0").correction(inline=True) == (0.9, 0)
    assert freekv("cover=2").correction(inline=True) == (0.7, 2)
    assert parse_kv_spec("quest:budget=1024").retrieval.correction(inline=True) == (1.0, 0)
