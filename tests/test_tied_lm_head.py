"""A tied embedding / lm_head is held once: the logits MatMul reads the weights mapping the embedding
Gather reads instead of a prepacked copy of its own (`ort_shared.tied_matmul_weights`,
`engine.UNPACK_TIED`). Checked: which initializers qualify (tied yes, untied no), the model edit that
keeps them from being prepacked, the same greedy tokens with and without it, and the resident
memory it saves, measured in fresh subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


@pytest.fixture(scope="module")
def tied_big_vocab(tmp_path_factory):
    """A tied tiny llama with a 64 MiB embedding table (vocab 32768 x 512), so a second copy of it
    stands out of the process's noise."""
    from kvtrt.export import export_model
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", vocab_size=32768, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4)
    assert model.config.tie_word_embeddings
    directory = tmp_path_factory.mktemp("tiny-tied")
    export_model((model, tiny_tokenizer()), directory, progress=False, score_window=4)
    return directory


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    from kvtrt.export import export_model
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("mistral")
    assert not model.config.tie_word_embeddings
    directory = tmp_path_factory.mktemp("tiny-untied")
    export_model((model, tiny_tokenizer()), directory, progress=False, score_window=4)
    return directory


def test_tied_weight_found_and_declared_as_input(tied_big_vocab, untied):
    import onnx

    from kvtrt.manifest import Manifest
    from kvtrt.runtime import ort_shared

    m = Manifest.load(tied_big_vocab)
    for graph in m.graphs.values():
        tied = ort_shared.tied_matmul_weights(tied_big_vocab / graph)
        assert len(tied) == 1 and tied[0].data_type == 1 and sorted(tied[0].dims) == [512, 32768]
        edited = onnx.load_from_string(ort_shared.with_graph_inputs((tied_big_vocab / graph).read_bytes(), tied))
        original = onnx.load(str(tied_big_vocab / graph), load_external_data=False)
        assert [i.name for i in edited.graph.input] == [i.name for i in original.graph.input] + [tied[0].name]
        declared = edited.graph.input[-1].type.tensor_type
        assert declared.elem_type == 1 and [d.dim_value for d in declared.shape.dim] == list(tied[0].dims)
        assert len(edited.graph.node) == len(original.graph.node)
        assert len(edited.graph.initializer) == len(original.graph.initializer)
    um = Manifest.load(untied)
    assert all(ort_shared.tied_matmul_weights(untied / g) == [] for g in um.graphs.values())


def test_engine_unpacks_tied_only(tied_big_vocab, untied):
    from kvtrt.runtime import engine as E

    if not E.SHARE_WEIGHTS:
        pytest.skip("shared-weight sessions are off")
    tied = E.OrtEngine(tied_big_vocab, threads=1)
    if tied._shared is None:
        pytest.skip("onnxruntime's C API is not usable here")
    assert len(tied._shared.unpacked) == 1
    assert not E.OrtEngine(untied, threads=1)._shared.unpacked
    old = E.UNPACK_TIED
    try:
        E.UNPACK_TIED = False
        assert not E.OrtEngine(tied_big_vocab, threads=1)._shared.unpacked
    finally:
        E.UNPACK_TIED = old


_PROBE = textwrap.dedent("""
    import json, sys
    import kvtrt
    from kvtrt.runtime import engine as E
    from kvtrt.runtime.memory import return_freed_memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    directory, unpack = sys.argv[1], sys.argv[2] == "1"
    E.UNPACK_TIED = unpack
    before = rss_mib()
    llm = kvtrt.load(directory, threads=1, prefix_cache=0)
    prompt = list(range(3, 200)) * 2  # 394 ids: the lookups read the table, the logits MatMul all of it
    r = llm.generate(prompt, max_new_tokens=6, ignore_eos=True)
    return_freed_memory()
    after = rss_mib()
    print("KVTRT_RSS " + json.dumps({"grown": after - before, "tokens": r.token_ids,
                                     "unpacked": sorted(llm.engine._shared.unpacked)}))
    llm.close()
""")


def _probe(directory, unpack: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(directory), "1" if unpack else "0"],
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("KVTRT_RSS "):
            return json.loads(line[len("KVTRT_RSS "):])
    raise AssertionError(f"probe failed:\n{proc.stderr[-3000:]}")


def test_tied_table_resident_once(tied_big_vocab):
    from kvtrt.runtime import engine as E, ort_shared

    if not (E.SHARE_WEIGHTS and ort_shared.available()):
        pytest.skip("shared-weight sessions are not in use")
    table_mib = 32768 * 512 * 4 / 2**20
    new, old = _probe(tied_big_vocab, True), _probe(tied_big_vocab, False)
    assert new["unpacked"] and not old["unpacked"]
    assert new["tokens"] == old["tokens"]  # same greedy tokens
    # packed: the packed copy plus the table pages the lookups and nothing else read; unpacked: the
    # table once (measured 64 MiB apart)
    assert old["grown"] - new["grown"] >= 0.7 * table_mib, (old["grown"], new["grown"])


def test_batched_calls_use_a_packed_twin(tied_big_vocab):
    """One sequence per call reads the unpacked table (no twin); a call of several sequences goes to
    a twin session with the tied weight prepacked (MLAS would pack it on every call otherwise), and
    each row still gets the tokens it gets alone."""
    import kvtrt
    from kvtrt.runtime import engine as E

    if not E.SHARE_WEIGHTS:
        pytest.skip("shared-weight sessions are off")
    llm = kvtrt.load(tied_big_vocab, threads=1, prefix_cache=0)
    try:
        if not llm.engine._unpacks_tied():
            pytest.skip("onnxruntime's C API is not usable here")
        prompts = [list(range(3, 40)), list(range(50, 70)), list(range(100, 160))]
        alone = [llm.generate(p, max_new_tokens=8, ignore_eos=True).token_ids for p in prompts]
        assert llm.engine.packed_sessions == {}
        together = [r.token_ids for r in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)]
        assert set(llm.engine.packed_sessions) == {"decode_shared"}
        assert together == alone
        assert llm.engine._shared.unpacked  # the twin did not change what the others read
    finally:
        llm.close()
