"""`select=previous` (FreeKV / Quest on one view, no worker): after a step, the heads whose query moved
from the one their pages were chosen with re-select with that step's query; the next step attends
those pages."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kvtrt
from kvtrt.runtime.kv.freekv import FreeKVRetrieval
from kvtrt.runtime.kv.spec import parse_kv_spec
from tiny import random_prompt

SPEC = "page=8,sink=4,window=8,pool_dtype=fp32,min_context=0"


@pytest.mark.parametrize("mode", ["quest", "freekv:tau=1"])
def test_each_step_attends_pages_chosen_with_the_previous_steps_query(tiny_llama, monkeypatch, mode):
    """Every head re-selects (quest, tau=1): at each step the view holds exactly a fresh top-k with
    the query of the step before (the first step: the prompt's last query); one view serves every step
    and no worker runs."""
    name, _, extra = mode.partition(":")
    spec = f"{name}:budget=48,{SPEC},select=previous" + (f",{extra}" if extra else "")
    checked, previous = [], []
    finish = FreeKVRetrieval.finish_step

    def checking_finish(self, query, new_keys, new_values):
        view = self.view()
        assert view is self.views[0] and not self.prefetching
        chosen_with = previous[-1] if previous else self._basis[0]
        for layer in range(self.n_layers):
            fresh = np.sort(self.fresh_selection(layer, np.asarray(chosen_with[layer]), view), -1)
            assert np.array_equal(np.sort(view.slot_pages[layer], -1), fresh), (len(checked), layer)
        checked.append(1)
        previous.append(np.stack([np.array(q) for q in query]))
        return finish(self, query, new_keys, new_values)

    monkeypatch.setattr(FreeKVRetrieval, "finish_step", checking_finish)
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    result = llm.generate(random_prompt(200), max_new_tokens=12, kv=spec)
    assert result.stats.kv["retrieval_engaged"] == 1 and len(checked) == 11
    stats = result.stats.kv
    assert stats["heads_checked"] == stats["heads_corrected"] > 0
    monkeypatch.undo()
    speculative = llm.generate(random_prompt(200), max_new_tokens=12, kv=spec.replace("previous", "speculative"))
    assert 2 * stats["view_bytes"] == speculative.stats.kv["view_bytes"]  # one view against two
    llm.close()


@pytest.mark.parametrize("spec", [f"quest:budget=600,{SPEC},select=previous",
                                  f"freekv:budget=600,{SPEC},tau=0.9,select=previous"])
def test_covering_budget_matches_the_full_cache(tiny_llama, spec):
    """A budget that holds every token attends to all of them: the full cache's tokens."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    prompt = random_prompt(220, seed=1)
    full = llm.generate(prompt, max_new_tokens=24, kv="full").token_ids
    got = llm.generate(prompt, max_new_tokens=24, kv=spec)
    assert got.stats.kv["retrieval_engaged"] == 1 and got.token_ids == full
    llm.close()


def test_previous_rows_decode_concurrently_as_alone_and_are_admitted_with_one_view(tiny_llama):
    """Rows with select=previous beside speculative ones: four threads get what each request gets
    alone; admission counts one view for them, two for speculative rows."""
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    specs = [f"freekv:budget=48,{SPEC},tau=0.9,select=previous", f"freekv:budget=48,{SPEC},tau=0.9,select=speculative",
             f"quest:budget=48,{SPEC},select=previous", f"freekv:budget=48,{SPEC},tau=0.8,select=previous"]
    prompts = [random_prompt(120 + 40 * i, seed=10 + i) for i in range(4)]
    alone = [llm.generate(p, max_new_tokens=10 + 3 * i, kv=s).token_ids for i, (p, s) in enumerate(zip(prompts, specs))]
    with ThreadPoolExecutor(4) as pool:  # submitted from four threads, decoded in one running batch
        requests = list(pool.map(lambda i: llm.submit(prompts[i], max_new_tokens=10 + 3 * i, kv=specs[i]), range(4)))
    assert [r.result().token_ids for r in requests] == alone
    one, two = (llm.request_bytes(prompts[0], max_new_tokens=10, kv=s) for s in specs[:2])
    view = parse_kv_spec(specs[0]).retrieval.slots(len(prompts[0])) + 1  # slots, and the staging slot
    assert two - one == view * llm.manifest.kv_bytes_per_token
    llm.close()


def test_rerun_attends_pages_chosen_with_the_steps_own_query(tiny_llama, monkeypatch):
    """rerun=1 with tau=1 (every step whose query moved at all runs again): the run whose output is
    kept attended pages freshly chosen with the query its first run computed, as Quest's second pass;
    the first layer's query does not depend on the pages, so its pages are the rerun's own query's."""
    spec = f"freekv:budget=48,{SPEC},tau=1,select=previous,rerun=1"
    probes, checked = [], []
    moved, finish = FreeKVRetrieval.moved, FreeKVRetrieval.finish_step

    def recording_moved(self, query, threshold):
        probes.append(np.stack([np.array(q) for q in query]))
        return moved(self, query, threshold)

    def checking_finish(self, query, new_keys, new_values):
        view = self.view()
        for layer in range(self.n_layers):
            fresh = np.sort(self.fresh_selection(layer, probes[-1][layer], view), -1)
            assert np.array_equal(np.sort(view.slot_pages[layer], -1), fresh), (len(checked), layer)
        own = np.sort(self.fresh_selection(0, np.asarray(query[0]), view), -1)
        assert np.array_equal(np.sort(view.slot_pages[0], -1), own)
        checked.append(1)
        return finish(self, query, new_keys, new_values)

    monkeypatch.setattr(FreeKVRetrieval, "moved", recording_moved)
    monkeypatch.setattr(FreeKVRetrieval, "finish_step", checking_finish)
    _, _, directory = tiny_llama
    llm = kvtrt.load(directory, torch_threads=1)
    llm.manifest.eos_token_ids = []
    got = llm.generate(random_prompt(200, seed=2), max_new_tokens=12, kv=spec)
    assert len(checked) == len(probes) == 11 and got.stats.kv["reruns"] == 11
    monkeypatch.undo()
    never = llm.generate(random_prompt(200, seed=2), max_new_tokens=12, kv=spec.replace("rerun=1", "rerun=0"))
    assert never.stats.kv["reruns"] == 0
    covering = llm.generate(random_prompt(220, seed=1), max_new_tokens=24, kv=spec.replace("budget=48", "budget=600"))
    assert covering.token_ids == llm.generate(random_prompt(220, seed=1), max_new_tokens=24, kv="full").token_ids
    llm.close()


def test_auto_takes_previous_for_freekv_on_a_cpu_engine_only():
    """select=auto: fresh on an export with decode groups; else FreeKV on a CPU engine runs `previous`
    (one view), on a GPU `speculative`; Quest keeps its two passes everywhere but on decode groups."""
    class Export:
        decode_groups: list = []

    grouped = type("Grouped", (), {"decode_groups": [[0, 1]]})()
    freekv, quest = (parse_kv_spec(f"{m}:budget=48,{SPEC}").retrieval for m in ("freekv", "quest"))
    assert [freekv.path(Export(), host) for host in (True, False)] == ["previous", "speculative"]
    assert [quest.path(Export(), host) for host in (True, False)] == ["speculative", "speculative"]
    assert freekv.path(grouped, False) == quest.path(grouped, True) == "fresh"
    assert [freekv.views(Export(), host) for host in (True, False)] == [1, 2]
    explicit = parse_kv_spec(f"freekv:budget=48,{SPEC},select=speculative").retrieval
    assert explicit.path(Export(), True) == "speculative"
