"""An fp16 KV cache on an fp32 export (`kvtrt export --kv-dtype fp16`, `kvtrt.export.kv_dtype`):
the graphs read and write half-size K/V, the runtime holds half the bytes, and decoding stays within
fp16 rounding of the fp32 cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import kvtrt
from kvtrt.eval.decoding import decode, prefill
from kvtrt.export import export_model
from kvtrt.export.kv_dtype import set_kv_dtype
from kvtrt.export.validate import export_kind
from kvtrt.manifest import Manifest

# logits of the tiny model are O(5); fp16 K/V round by <= 2**-11 relative: measured max abs 0.008
LOGIT_ATOL = 0.05
IDS = [int(x) for x in np.random.default_rng(0).integers(5, 261, 300)]


@pytest.fixture(scope="module")
def kv16(tiny_llama, tmp_path_factory):
    """(fp32 export, the same export with an fp16 KV cache)."""
    _, _, directory = tiny_llama
    copy = tmp_path_factory.mktemp("tiny-kv16") / "export"
    shutil.copytree(directory, copy)
    set_kv_dtype(copy, "fp16")
    return directory, copy


def test_graphs_read_and_write_fp16_kv(kv16):
    fp32, fp16 = kv16
    manifest = Manifest.load(fp16)
    assert (manifest.dtype, manifest.kv_dtype) == ("fp32", "fp16")
    assert manifest.kv_bytes_per_token * 2 == Manifest.load(fp32).kv_bytes_per_token
    assert export_kind(manifest) == "fp16"  # validate compares it with the fp16 tolerances
    kv = ("past_key.", "past_value.", "present_key.", "present_value.", "key.", "value.", "query.", "lookahead.")
    for filename in manifest.graphs.values():
        graph = onnx.load(str(fp16 / filename), load_external_data=False).graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
        floats = {name: t for name, t in types.items() if t in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        assert any(name.startswith("past_key.") for name in floats)
        for name, t in floats.items():
            want = TensorProto.FLOAT16 if name.startswith(kv) else TensorProto.FLOAT  # logits, score, hidden
            assert t == want, (filename, name)
        onnx.checker.check_model(str(fp16 / filename))


def test_set_kv_dtype_refuses_what_it_cannot_do(kv16, tiny_llama, tmp_path):
    _, fp16 = kv16
    assert set_kv_dtype(fp16, "fp16").kv_dtype == "fp16"  # already: nothing to do
    with pytest.raises(ValueError, match="only an fp32 KV cache"):
        set_kv_dtype(fp16, "fp32")
    with pytest.raises(ValueError, match="use one of fp32, fp16"):
        set_kv_dtype(fp16, "int8")
    model, tokenizer, _ = tiny_llama
    with pytest.raises(ValueError, match="drop --kv-dtype"):
        export_model((model, tokenizer), tmp_path / "x", dtype="fp16", kv_dtype="fp32", progress=False)


def test_an_old_manifest_keeps_its_kv_in_the_model_dtype(kv16, tmp_path):
    """Exports made before `kv_dtype` existed store K/V in their `dtype`."""
    fp32, _ = kv16
    copy = tmp_path / "old"
    shutil.copytree(fp32, copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["kv_dtype"]
    data["dtype"] = "fp16"  # the manifest alone (the graphs are not opened): kv_dtype follows dtype
    (copy / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(copy).kv_dtype == "fp16"


def test_the_store_holds_the_fp32_cache_rounded_to_fp16(kv16):
    """One prefill chunk: layer 0's keys and values are the fp32 export's rounded to fp16 (its input
    does not depend on the cache); later layers' inputs went through fp16 attention: within 1e-2."""
    a, b = (kvtrt.load(d) for d in kv16)
    ids = IDS[:100]  # one chunk
    want, got = prefill(a, ids).store, prefill(b, ids).store
    for layer in range(a.engine.manifest.n_layers):
        for x, y in ((want.keys[layer], got.keys[layer]), (want.values[layer], got.values[layer])):
            assert y.dtype == np.float16 and x.dtype == np.float32
            rounded = x[:, :, :100].astype(np.float16)
            if layer == 0:
                np.testing.assert_array_equal(y[:, :, :100], rounded)
            else:
                np.testing.assert_allclose(y[:, :, :100], rounded, atol=1e-2, rtol=0)


@pytest.mark.parametrize("spec", ["full", "snapkv:budget=128",
                                  "freekv:budget=64,page=8,window=16,min_context=0,select=speculative",
                                  "freekv:budget=400,page=8,window=16,min_context=0,select=previous",
                                  "freekv:budget=64,page=8,window=16,min_context=0,select=inline",
                                  "quest:budget=64,page=8,window=16,min_context=0"])  # (auto: inline too)
def test_decoding_stays_within_fp16_rounding(kv16, spec):
    """The fp32 cache's greedy tokens, forced through the fp16 cache: every step's logits within
    LOGIT_ATOL, and not identical (the fp16 graphs really ran). (`select=previous` with a budget that
    covers the sequence: it re-selects a page as soon as it leaves the window, so with a smaller budget
    an fp16-rounded query may pick another page where two score alike, and the two caches then attend
    different tokens; the speculative path and Quest meet no such tie on this prompt.)"""
    a, b = (kvtrt.load(d) for d in kv16)
    want = decode(a, IDS, 40, spec, keep_logits=True)
    got = decode(b, IDS, 40, spec, teacher=want.tokens, keep_logits=True)
    diff = np.abs(np.stack(want.logits) - np.stack(got.logits)).max()
    assert 0 < diff < LOGIT_ATOL


@pytest.mark.parametrize("spec, ratio", [("full", 0.5), ("snapkv:budget=128", 0.5), ("kvcrush:budget=128", 0.5)])
def test_the_cache_takes_half_the_bytes(kv16, spec, ratio):
    """Dense and compacted caches halve exactly (KVCrush's picks may differ: its binary signatures
    threshold scores that fp16 keys move slightly, so only its size is compared)."""
    a, b = (kvtrt.load(d) for d in kv16)
    want, got = decode(a, IDS, 8, spec), decode(b, IDS, 8, spec)
    assert got.stats.kv_bytes == want.stats.kv_bytes * ratio


def most_at_once(stats) -> int:
    """The most requests holding KV at the same time (overlaps of [admitted_at, finished_at))."""
    return max(sum(s.admitted_at <= t.admitted_at < s.finished_at for s in stats) for t in stats)


def test_kv_memory_admits_twice_the_sequences(kv16):
    """Admission counts real bytes: under the cap that runs two fp32-cache requests at once (the
    third waits; test_scheduler.py), twice as many fp16-cache requests run at once."""
    fp32, fp16 = kv16
    prompt, new = IDS[:200], 8
    probe = kvtrt.load(fp32)
    assert kvtrt.load(fp16).request_bytes(prompt, new) * 2 == probe.request_bytes(prompt, new)
    per_token = probe.manifest.kv_bytes_per_token
    cap = 2 * 216 * per_token + 200 * per_token  # two rows (prompt + 16 slots) and one prefill, fp32
    together = {}
    for directory in (fp32, fp16):
        llm = kvtrt.load(directory, kv_memory=cap)
        llm.manifest.eos_token_ids = []
        with llm.scheduler._lock:  # all queued before the scheduler looks at any
            requests = [llm.submit(prompt, max_new_tokens=new) for _ in range(6)]
        together[directory] = most_at_once([r.result().stats for r in requests])
        assert llm.stats().kv_bytes_used == 0
        llm.close()
    assert together[fp32] == 2
    assert together[fp16] >= 4


def test_validate_passes_and_sees_the_rounding(kv16, tiny_llama, tmp_path):
    """`kvtrt validate` runs the fp16-KV graphs against the fp32 reference with the fp16 tolerances:
    it passes, and its errors are fp16's (above the fp32 export's < 1e-4)."""
    from kvtrt.export.validate import validate

    model, _, _ = tiny_llama
    report = validate(kv16[1], reference_model=model, save_dir=tmp_path, run_lint=False)
    assert report.passed, report.table()
    assert max(c.max_abs for c in report.checks if c.output.startswith("present_key.")) > 1e-4


def test_fp16_prefill_chunks_bound_the_attention_scratch(kv16, monkeypatch):
    """ORT's fp16 attention keeps heads x chunk x slots fp32 scores: chunks shrink to fit the bound
    (multiples of 64), the fp32 cache's do not, and the result is the same prefill."""
    from kvtrt.runtime import prefill as prefill_module
    from kvtrt.runtime.prefill import PrefillJob

    a, b = (kvtrt.load(d) for d in kv16)
    whole = PrefillJob(b.engine, IDS, 512, track_scores=False)
    heads = b.engine.manifest.n_heads
    monkeypatch.setattr(prefill_module, "FP16_ATTENTION_SCRATCH", heads * whole.store.capacity * 4 * 130)
    cut = PrefillJob(b.engine, IDS, 512, track_scores=False)
    assert cut.chunks == [(0, 128), (128, 256), (256, 300)]
    assert len(PrefillJob(a.engine, IDS, 512, track_scores=False).chunks) == 1 == len(whole.chunks)
    (_, want, _), (_, got, _) = whole.run(), cut.run()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_export_command_with_fp16_kv_and_int4_weights(tiny_llama, tmp_path):
    """`kvtrt export HF_DIR --kv-dtype fp16 --quantize int4`: both recorded, and it decodes close to the
    same int4 model with an fp32 cache (MatMulNBits quantizes activations to int8 per block, which
    turns fp16's rounding into up to ~0.12 on these logits: measured 0.117)."""
    from kvtrt.cli import main
    from kvtrt.export.quantize import quantize_export

    model, tokenizer, directory = tiny_llama
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    out = tmp_path / "int4-kv16"
    assert main(["export", str(tmp_path / "hf"), "-o", str(out), "--kv-dtype", "fp16", "--quantize", "int4",
                 "--score-window", "4", "-q"]) == 0
    manifest = Manifest.load(out)
    assert (manifest.dtype, manifest.kv_dtype, manifest.quantize) == ("fp32", "fp16", "int4")
    reference = tmp_path / "int4"
    shutil.copytree(directory, reference)
    quantize_export(reference)
    a, b = kvtrt.load(reference), kvtrt.load(out)
    want = decode(a, IDS, 24, "full", keep_logits=True)
    got = decode(b, IDS, 24, "full", teacher=want.tokens, keep_logits=True)
    x, y = np.stack(want.logits), np.stack(got.logits)
    assert 0 < np.abs(x - y).max() < 0.3
    assert (x.argmax(-1) == y.argmax(-1)).mean() >= 0.9


def test_decode_groups_with_an_fp16_cache(tmp_path):
    """`export_model(..., decode_groups=2, kv_dtype="fp16")`: the group graphs carry fp16 K/V and
    lookahead queries and fp32 hidden states; FreeKV choosing pages with each step's own query
    (select=fresh) decodes within fp16 rounding of the fp32 cache's grouped export, with a budget that
    covers the context (a smaller one can choose other pages: fp16 moves page scores slightly, and
    one different page moved these logits by 0.64)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_model, tiny_tokenizer

    exports = {}
    for kv_dtype in ("fp32", "fp16"):
        exports[kv_dtype] = tmp_path / kv_dtype
        export_model((tiny_model("llama", num_hidden_layers=4), tiny_tokenizer()), exports[kv_dtype],
                     progress=False, score_window=4, decode_groups=2, kv_dtype=kv_dtype)
    graph = onnx.load(str(exports["fp16"] / "decode_group.1.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert types["hidden"] == TensorProto.FLOAT and types["past_key.2"] == TensorProto.FLOAT16
    assert types["present_value.3"] == TensorProto.FLOAT16 and types["logits"] == TensorProto.FLOAT
    a, b = kvtrt.load(exports["fp32"]), kvtrt.load(exports["fp16"])
    spec = "freekv:budget=600,page=8,sink=4,window=8,min_context=0,select=fresh"
    want = decode(a, IDS, 24, spec, keep_logits=True)
    got = decode(b, IDS, 24, spec, teacher=want.tokens, keep_logits=True)
    diff = np.abs(np.stack(want.logits) - np.stack(got.logits)).max()
    assert 0 < diff < LOGIT_ATOL
