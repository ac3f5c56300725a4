"""kvtrt's CPU decode attention kernel (`runtime/cpu_kernels`) against ONNX Runtime's GroupQueryAttention."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from kvtrt.contract import GraphVariant  # noqa: E402
from kvtrt.manifest import Manifest  # noqa: E402
from kvtrt.runtime import cpu_kernels  # noqa: E402
from kvtrt.runtime.buffers import bind_decode, graph_outputs  # noqa: E402
from kvtrt.runtime.engine import OrtEngine  # noqa: E402

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no kernel: {cpu_kernels.unavailable()}")


@pytest.fixture(scope="module")
def group3_export(tmp_path_factory):
    """A tiny llama with SmolLM2's attention shape (head_dim 64, 3 query heads per KV head): the
    kernel's AVX-512 path where the CPU has it; the session's tiny export (head_dim 16) takes the
    portable one."""
    from kvtrt.export import export_model

    directory = tmp_path_factory.mktemp("tiny-g3")
    model = tiny_model("llama", hidden_size=384, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    export_model((model, tiny_tokenizer()), directory, progress=False, score_window=4)
    return directory


ROOM = 1024  # slots of random K/V drawn per row (rows are drawn apart: a row's data is the same in any batch)


def _row_kv(m, row: int, seed: int) -> np.ndarray:
    """Row `row`'s random K and V: [n_layers, 2, Hkv, ROOM, D]."""
    rng = np.random.default_rng([seed, row])
    return rng.standard_normal((m.n_layers, 2, m.n_kv_heads, ROOM, m.head_dim), dtype=np.float32)


def _step(directory, kernel: bool, lengths: list[int], dead: list[tuple[int, int]], seed: int = 0, rows=None):
    """One decode_shared call over rows of `lengths` live slots (random K/V, row r drawn as `_row_kv(r)`
    or `rows[r]`'s; `dead` (row, slot) masked): (logits [B,V], keys, values) after the call."""
    engine = OrtEngine(directory, threads=2, variants=["decode_shared"], decode_kernel=kernel)
    assert engine.decode_attention == ("kvtrt" if kernel else "onnxruntime")
    m = engine.manifest
    rows = rows or list(range(len(lengths)))
    batch, capacity = len(lengths), max(lengths) + 5
    data = [_row_kv(m, r, seed)[..., :capacity, :].astype(engine.dtype) for r in rows]
    keys = [np.ascontiguousarray(np.stack([d[layer, 0] for d in data])) for layer in range(m.n_layers)]
    values = [np.ascontiguousarray(np.stack([d[layer, 1] for d in data])) for layer in range(m.n_layers)]
    mask = np.zeros((batch, capacity), np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n + 1] = 1  # live past and the slot the step writes
    for row, slot in dead:
        mask[row, slot] = 0
    ids = np.asarray([[5 + 17 * r % (m.vocab_size - 5)] for r in rows], np.int64)
    positions = np.asarray([[n] for n in lengths], np.int64)
    slots = np.asarray(lengths, np.int64)
    outputs = graph_outputs(engine, batch, 1, None, cache=(keys, values))
    engine.run(GraphVariant.DECODE_SHARED, bind_decode(engine, GraphVariant.DECODE_SHARED, ids, positions, mask,
                                                       keys, values, outputs, write_slot=slots))
    return outputs["logits"][:, 0].copy(), keys, values


@pytest.fixture(scope="module")
def fp16_kv(tiny_llama, group3_export, tmp_path_factory):
    """The two exports with an fp16 KV cache (`kvtrt export --kv-dtype fp16`): DecodeAttention16."""
    from kvtrt.export.kv_dtype import set_kv_dtype

    out = {}
    for which, directory in (("tiny", tiny_llama[2]), ("group3", group3_export)):
        copy = tmp_path_factory.mktemp(f"{which}-kv16") / "export"
        shutil.copytree(directory, copy)
        set_kv_dtype(copy, "fp16")
        out[which] = copy
    return out


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("which", ["tiny", "group3"])
def test_kernel_matches_group_query_attention(which, kv_dtype, tiny_llama, group3_export, fp16_kv):
    """Rows of different lengths (each within one work item here; `test_rows_longer_than_a_work_item_
    merge_their_chunks` splits them) and dead slots in the middle: same logits as GroupQueryAttention
    (fp16 KV: to fp16 rounding of the op's output), the step's K/V written at each row's own slot and
    nothing else of the buffers touched."""
    directory = fp16_kv[which] if kv_dtype == "fp16" else tiny_llama[2] if which == "tiny" else group3_export
    lengths, dead = [3, 300, 41], [(1, 7), (1, 260), (2, 0)]
    got, keys, values = _step(directory, True, lengths, dead)
    want, want_keys, want_values = _step(directory, False, lengths, dead)
    tolerance = 1e-4 if kv_dtype == "fp32" else 2e-2  # logits O(5); fp16 rounds by 2**-11 relative
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    assert np.abs(got - want).max() < np.abs(want).max() * 1e-2
    for k, wk, v, wv in zip(keys, want_keys, values, want_values):
        assert k.dtype == wk.dtype == (np.float16 if kv_dtype == "fp16" else np.float32)
        np.testing.assert_allclose(k, wk, rtol=1e-3, atol=1e-3)  # the step's K/V: the same graph computes them
        np.testing.assert_allclose(v, wv, rtol=1e-3, atol=1e-3)
    m = Manifest.load(directory)  # every slot but the written ones as _step drew them
    original = [_row_kv(m, r, 0)[:, 0, :, :max(lengths) + 5].astype(keys[0].dtype)
                for r in range(len(lengths))]  # [L,Hkv,C,D] per row
    for layer, k in enumerate(keys):
        changed = {(r, int(s)) for r in range(len(lengths))
                   for _, s in np.argwhere((k[r] != original[r][layer]).any(axis=-1))}
        assert sorted(changed) == [(r, n) for r, n in enumerate(lengths)]


def test_kernel_rows_do_not_depend_on_their_batch(group3_export):
    """A row's attention does not depend on the rows beside it: its logits alone and in a batch agree
    (to the rounding of the batched matmuls around the op) with the kernel, and the kernel's work split
    depends only on the row's own length."""
    alone, _, _ = _step(group3_export, True, [300], [], rows=[1])
    together, _, _ = _step(group3_export, True, [5, 300, 700], [], rows=[0, 1, 2])
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [64, 256])
def test_rows_longer_than_a_work_item_merge_their_chunks(chunk, group3_export, monkeypatch, tmp_path):
    """A row's slots split into work items of CHUNK slots (2048 at most by default: built smaller here so that
    short rows span several) merge to GroupQueryAttention's result, and a row's result alone and in a
    batch agree (to the rounding of the batched matmuls around the op)."""
    monkeypatch.setattr(cpu_kernels, "FLAGS", [*cpu_kernels.FLAGS, f"-DCHUNK={chunk}"])
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv("KVTRT_CACHE_DIR", str(tmp_path))
    assert cpu_kernels.library().parent == tmp_path / "kernels"
    lengths, dead = [3, 300, 41], [(1, 7), (1, 260), (2, 0)]
    got, _, _ = _step(group3_export, True, lengths, dead)
    want, _, _ = _step(group3_export, False, lengths, dead)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    alone, _, _ = _step(group3_export, True, [300], [], rows=[1])
    together, _, _ = _step(group3_export, True, [5, 300, 700], [], rows=[0, 1, 2])
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-5, atol=1e-5)


def test_unbound_outputs_start_from_the_past(tiny_llama):
    """Run without IO binding (as a checker runs the graph), the op returns the past with the new slot
    written, in fresh output tensors, and the same attention as GroupQueryAttention."""
    import onnxruntime as ort

    directory = Path(tiny_llama[2])
    model = (directory / "decode_shared.onnx").read_bytes()
    runs = {}
    for kernel in (True, False):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
        if kernel:
            options.register_custom_ops_library(str(cpu_kernels.library()))
        session = ort.InferenceSession(cpu_kernels.with_decode_attention(model) if kernel else model, options,
                                       providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        feeds = {}
        for arg in session.get_inputs():
            if arg.name.startswith("past_"):
                feeds[arg.name] = rng.standard_normal((2, 2, 12, 16), dtype=np.float32)
        feeds.update(input_ids=np.asarray([[7], [9]], np.int64), position_ids=np.asarray([[11], [4]], np.int64),
                     past_mask=np.ones((2, 12), np.int64), write_slot=np.asarray([11, 4], np.int64))
        feeds["past_mask"][1, 5:] = 0
        runs[kernel] = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds))), feeds
    (got, feeds), (want, _) = runs[True], runs[False]
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    k0 = got["present_key.0"]
    assert not np.shares_memory(k0, feeds["past_key.0"])
    np.testing.assert_array_equal(np.delete(k0[0], 11, axis=1), np.delete(feeds["past_key.0"][0], 11, axis=1))
    np.testing.assert_array_equal(np.delete(k0[1], 4, axis=1), np.delete(feeds["past_key.0"][1], 4, axis=1))
    np.testing.assert_allclose(k0[:, :, [11, 4]].diagonal(axis1=0, axis2=2), want["present_key.0"][:, :, [11, 4]]
                               .diagonal(axis1=0, axis2=2), rtol=1e-5, atol=1e-5)


def test_rewrite_needs_packed_group_query_attention(tiny_llama):
    """Only graphs whose GroupQueryAttention reads packed qkv (the in-place graphs) are rewritten; a
    graph without one, or with separate key/value inputs, is refused with the reason."""
    directory = Path(tiny_llama[2])
    with pytest.raises(ValueError, match="no GroupQueryAttention"):
        cpu_kernels.with_decode_attention((directory / "decode.onnx").read_bytes())
    with pytest.raises(ValueError, match="packed qkv"):
        cpu_kernels.with_decode_attention((directory / "prefill.onnx").read_bytes())


def test_the_variable_turns_it_off_or_forces_it(tiny_llama, group3_export, monkeypatch):
    monkeypatch.setenv("KVTRT_DECODE_KERNEL", "0")
    assert OrtEngine(group3_export, variants=[]).decode_attention == "onnxruntime"
    monkeypatch.setenv("KVTRT_DECODE_KERNEL", "force")  # what tests/conftest.py sets for the suite
    assert OrtEngine(tiny_llama[2], variants=[]).decode_attention == "kvtrt"
    monkeypatch.setenv("KVTRT_DECODE_KERNEL", "1")
    assert OrtEngine(group3_export, variants=[]).decode_attention == "kvtrt"


def test_other_head_sizes_keep_group_query_attention_unless_asked(tiny_llama, group3_export, monkeypatch):
    """The vector paths cover head size 64; the tiny export's 16 would run the portable loops."""
    monkeypatch.delenv("KVTRT_DECODE_KERNEL")
    assert OrtEngine(group3_export, variants=[]).decode_attention == "kvtrt"
    assert OrtEngine(tiny_llama[2], variants=[]).decode_attention == "onnxruntime"
    assert OrtEngine(tiny_llama[2], variants=[], decode_kernel=True).decode_attention == "kvtrt"


def test_no_compiler_keeps_group_query_attention_and_says_so(tiny_llama, monkeypatch, tmp_path):
    """Without a C compiler the engine warns once and decodes with GroupQueryAttention; asking for the
    kernel explicitly fails with the reason (so does asking for kvtrt's MatMul kernel; by default the
    projections run ONNX Runtime's MatMul anyway)."""
    monkeypatch.delenv("KVTRT_DECODE_KERNEL")
    monkeypatch.delenv("KVTRT_MATMUL_KERNEL")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KVTRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels.warn_unavailable, "said", False, raising=False)
    with pytest.warns(RuntimeWarning, match="no-such-cc"):
        engine = OrtEngine(tiny_llama[2], variants=[])
    assert engine.decode_attention == "onnxruntime"
    assert engine.matmul == "onnxruntime"
    with pytest.raises(RuntimeError, match="cannot be built.*no-such-cc"):
        OrtEngine(tiny_llama[2], variants=[], decode_kernel=True)
    for setting in ("1", "force"):
        monkeypatch.setenv("KVTRT_MATMUL_KERNEL", setting)
        with pytest.raises(RuntimeError, match="MatMul kernel cannot be built.*no-such-cc.*unset"):
            OrtEngine(tiny_llama[2], variants=[])


def test_an_unwritable_cache_builds_in_the_temp_folder(monkeypatch, tmp_path):
    import tempfile

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("KVTRT_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cpu_kernels, "_built", {})
    path = cpu_kernels.library()
    assert path is not None and path.parent.parent == Path(tempfile.gettempdir()) and path.exists()


def test_plain_onnxruntime_sessions_run_the_kernel_too(group3_export, monkeypatch):
    """Without the shared-weights sessions (one Python InferenceSession per graph) the kernel is
    registered and the graph rewritten the same way: the same logits as the shared sessions (both with
    ONNX Runtime's MatMul: plain sessions do not run kvtrt's PackedMatMul)."""
    import kvtrt.runtime.engine as engine_module

    monkeypatch.setenv("KVTRT_MATMUL_KERNEL", "0")

    lengths = [300, 41]
    shared, _, _ = _step(group3_export, True, lengths, [])
    monkeypatch.setattr(engine_module, "SHARE_WEIGHTS", False)
    plain, _, _ = _step(group3_export, True, lengths, [])
    gqa, _, _ = _step(group3_export, False, lengths, [])
    np.testing.assert_array_equal(plain, shared)
    np.testing.assert_allclose(plain, gqa, rtol=1e-4, atol=1e-4)


def test_without_avx512_the_engine_keeps_group_query_attention_unless_asked(group3_export, monkeypatch):
    """The portable build (no AVX-512, no AVX2) is slower than GroupQueryAttention on long caches: used
    only when asked for."""
    monkeypatch.delenv("KVTRT_DECODE_KERNEL")
    monkeypatch.setattr(cpu_kernels, "vectorised", lambda path: False)
    assert OrtEngine(group3_export, variants=[]).decode_attention == "onnxruntime"
    assert OrtEngine(group3_export, variants=[], decode_kernel=True).decode_attention == "kvtrt"


@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True,
                    reason="the AVX-512 path needs a CPU with AVX-512")
def test_the_avx512_path_is_built_where_the_cpu_has_it():
    assert cpu_kernels.vectorised(cpu_kernels.library())


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True,
                    reason="the AVX2 path needs a CPU with AVX2")
@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16"])
def test_the_avx2_path_matches_group_query_attention(kv_dtype, group3_export, fp16_kv, monkeypatch, tmp_path):
    """The build a CPU without AVX-512 gets (here: the same source compiled with -mno-avx512f) on
    SmolLM2's attention shape: the same logits as GroupQueryAttention."""
    monkeypatch.setattr(cpu_kernels, "FLAGS", [*cpu_kernels.FLAGS, "-mno-avx512f"])
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv("KVTRT_CACHE_DIR", str(tmp_path))
    library = cpu_kernels.library()
    assert library.parent == tmp_path / "kernels" and cpu_kernels.vectorised(library)
    directory = fp16_kv["group3"] if kv_dtype == "fp16" else group3_export
    lengths, dead = [3, 300, 41], [(1, 7), (1, 260), (2, 0)]
    got, keys, _ = _step(directory, True, lengths, dead)
    want, want_keys, _ = _step(directory, False, lengths, dead)
    tolerance = 1e-4 if kv_dtype == "fp32" else 2e-2
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    for k, wk in zip(keys, want_keys):
        np.testing.assert_allclose(k, wk, rtol=1e-3, atol=1e-3)


def test_load_chooses_the_decode_attention(tiny_llama):
    """`kvtrt.load(dir, decode_kernel=...)`: the same greedy tokens either way on the tiny model."""
    import kvtrt

    tokens = {}
    for choice, name in ((False, "onnxruntime"), (True, "kvtrt")):
        llm = kvtrt.load(tiny_llama[2], decode_kernel=choice)
        assert llm.engine.decode_attention == name
        tokens[name] = llm.generate([5, 9, 13, 200, 77] * 60, max_new_tokens=12, ignore_eos=True).token_ids
        llm.close()
    assert tokens["kvtrt"] == tokens["onnxruntime"] and len(tokens["kvtrt"]) == 12
