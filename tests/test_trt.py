"""TensorRT: written trtexec/polygraphy commands and their profiles; engine build + TrtEngine on a GPU."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtrt.export.trt import (check_profiles, check_trt_graph, parse_trtexec_profiles, trt_profiles,
                              write_trt_commands)
from kvtrt.contract import input_names
from kvtrt.manifest import Manifest


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    from tiny import tiny_model, tiny_tokenizer

    from kvtrt.export import export_model

    model = tiny_model("llama")
    directory = tmp_path_factory.mktemp("tiny-fp16")
    export_model((model, tiny_tokenizer()), directory, dtype="fp16", progress=False, score_window=4)
    return model, directory


def _assert_consistent(profiles: dict, manifest: Manifest, chunk: int, capacity: int, view: int, batch: int):
    """What every profile must satisfy, checked on shapes parsed back from the written commands."""
    assert set(profiles) == {"prefill", "decode"}
    for graph, shapes in profiles.items():
        assert sorted(shapes) == sorted(input_names(manifest.n_layers, graph))
        for name, (lo, opt, hi) in shapes.items():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (graph, name, lo, opt, hi)
        for which in range(3):
            shape = {name: s[which] for name, s in shapes.items()}
            assert len({s[0] for n, s in shape.items() if n != "score_queries"}) == 1, f"{graph}: batch differs"
            assert shape.get("score_queries", (1,))[0] <= shape["input_ids"][1]  # rows of the chunk
            assert shape["input_ids"] == shape["position_ids"]
            slots = shape["past_mask"][1]
            for layer in range(manifest.n_layers):
                for kind in ("past_key", "past_value"):
                    b, h, p, d = shape[f"{kind}.{layer}"]
                    assert (h, d) == (manifest.n_kv_heads, manifest.head_dim)
                    assert p == slots, f"{graph}: {kind}.{layer} P={p} but past_mask P={slots}"
    pre, dec = profiles["prefill"], profiles["decode"]
    assert [s[1] for s in pre["input_ids"]] == [1, chunk, chunk]
    assert [s[1] for s in pre["past_mask"]] == [0, capacity // 2, capacity]
    assert [s[1] for s in dec["input_ids"]] == [1, 1, 1]
    assert dec["past_mask"][2][1] == view and dec["past_mask"][0][1] >= 1
    assert [s[0] for s in pre["input_ids"]] == [1, 1, batch]


def test_written_trtexec_profiles_are_self_consistent(fp16_export, tmp_path):
    _, directory = fp16_export
    manifest = Manifest.load(directory)
    written = write_trt_commands(directory, tmp_path, max_batch=4, prefill_chunk=64, capacity=256, decode_view=128)
    text = written.script.read_text()
    profiles = parse_trtexec_profiles(text)
    _assert_consistent(profiles, manifest, 64, 256, 128, 4)
    # the polygraphy command carries the same profiles
    for graph, shapes in profiles.items():
        block = text[text.index(f'polygraphy run "$EXPORT/{graph}.onnx"'):]
        for which, flag in enumerate(("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes")):
            args = block[block.index(flag) + len(flag):].split("\\\n")[0]
            parsed = {}
            for item in shlex.split(args):
                name, dims = item.rsplit(":", 1)
                parsed[name] = tuple(int(d) for d in dims.strip("[]").split(","))
            assert parsed == {name: s[which] for name, s in shapes.items()}
    # TensorRT 11 typing and the build flags
    assert 'TRT_TYPING="${TRT_TYPING---stronglyTyped}"' in text and "--strongly-typed" in text
    assert text.count("$TRT_TYPING --skipInference") == 2
    assert text.count("--saveEngine=") == 2 and text.count("--skipInference") == 2
    subprocess.run(["bash", "-n", str(written.script)], check=True)  # valid shell
    assert any("standard ONNX ops only" in note for note in written.notes)


def test_saved_inputs_fit_the_profiles_and_run_in_onnxruntime(fp16_export, tmp_path):
    _, directory = fp16_export
    manifest = Manifest.load(directory)
    written = write_trt_commands(directory, tmp_path, prefill_chunk=64, capacity=256, decode_view=128)
    text = written.script.read_text()
    profiles = parse_trtexec_profiles(text)
    for graph in ("prefill", "decode"):
        shapes = re.search(rf'--loadEngine="\$HERE/{graph}.engine" \\\n  --shapes=(\S+)', text).group(1)
        for item in shapes.split(","):
            name, dims = item.rsplit(":", 1)
            shape = tuple(int(d) for d in dims.split("x"))
            lo, _, hi = profiles[graph][name]
            assert all(a <= d <= b for a, d, b in zip(lo, shape, hi))
            dtype = np.int64 if name in ("input_ids", "position_ids", "past_mask", "score_queries") else np.float16
            raw = np.fromfile(tmp_path / "inputs" / graph / f"{name}.bin", dtype=dtype)
            assert raw.size == int(np.prod(shape)), name
    # the polygraphy inputs are valid for the graphs: replay them with the ONNX Runtime half of the command
    code = "import sys; from polygraphy.tools._main import main; sys.exit(main())"
    for graph in ("prefill", "decode"):
        subprocess.run([sys.executable, "-c", code, "run", str(directory / f"{graph}.onnx"), "--onnxrt", "-q",
                        "--load-inputs", str(tmp_path / f"{graph}_inputs.json")], check=True, capture_output=True)
    assert manifest.dtype == "fp16"


def test_profile_checker_catches_disagreeing_dims(fp16_export):
    _, directory = fp16_export
    manifest = Manifest.load(directory)
    profiles = trt_profiles(manifest, max_batch=2, prefill_chunk=16, capacity=64, decode_view=32)
    assert check_profiles(profiles, manifest) == []
    lo, opt, hi = profiles["decode"].shapes["past_key.1"]
    profiles["decode"].shapes["past_key.1"] = (lo, opt, (hi[0], hi[1], hi[2] + 1, hi[3]))
    lo, opt, hi = profiles["prefill"].shapes["past_mask"]
    profiles["prefill"].shapes["past_mask"] = ((2, lo[1]), opt, hi)
    problems = check_profiles(profiles, manifest)
    assert any("past_key.1 has P=33 but past_mask has 32" in p for p in problems)
    assert any("batch differs" in p for p in problems) and any("not min <= opt <= max" in p for p in problems)
    with pytest.raises(ValueError, match="positions"):
        trt_profiles(manifest, capacity=manifest.max_positions + 1)


def test_graphs_use_standard_ops_and_int4_is_refused(fp16_export, tmp_path):
    _, directory = fp16_export
    checks = check_trt_graph(directory)
    assert all(c.standard_only for c in checks.values())
    assert checks["decode"].input_types["past_key.0"] == "FLOAT16"
    assert checks["decode"].input_types["input_ids"] == "INT64"
    from kvtrt.export.quantize import quantize_export

    quantized = tmp_path / "int4"
    shutil.copytree(directory, quantized)
    quantize_export(quantized)
    assert not check_trt_graph(quantized)["decode"].standard_only
    with pytest.raises(ValueError, match="com.microsoft"):
        write_trt_commands(quantized, tmp_path / "cmds")


def test_fp32_export_gets_a_note(tmp_path):
    from tiny import tiny_model, tiny_tokenizer

    from kvtrt.export import export_model

    directory = tmp_path / "fp32-ops"
    export_model((tiny_model("llama"), tiny_tokenizer()), directory, attention="ops", progress=False)
    written = write_trt_commands(directory, tmp_path / "cmds")
    assert any("strongly typed" in note and "fp32 engine" in note for note in written.notes)


def test_fused_attention_export_is_refused_with_the_fix(tiny_llama, tmp_path):
    _, _, directory = tiny_llama  # fp32 default: prefill attention is com.microsoft GroupQueryAttention
    assert Manifest.load(directory).export_options["attention"] == "gqa"
    assert check_trt_graph(directory)["decode"].standard_only
    with pytest.raises(ValueError, match=r"GroupQueryAttention.*--attention ops"):
        write_trt_commands(directory, tmp_path / "cmds")


def test_trt_engine_without_gpu_says_why(fp16_export):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the clear-error path is for machines without one")
    from kvtrt.runtime.trt_engine import TrtEngine

    _, directory = fp16_export
    with pytest.raises(RuntimeError, match="NVIDIA GPU"):
        TrtEngine(directory)


def test_generate_cli_backend_tensorrt_without_gpu_says_why(fp16_export, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the clear-error path is for machines without one")
    from kvtrt.cli import main

    _, directory = fp16_export
    assert main(["generate", str(directory), "--prompt", "Hi", "--backend", "tensorrt"]) == 2
    assert "NVIDIA GPU" in capsys.readouterr().err


def _need_tensorrt():
    if not torch.cuda.is_available():
        pytest.skip("TensorRT backend needs an NVIDIA GPU; none is visible to torch on this machine")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("tensorrt is not installed (pip install 'kvtrt[trt]')")


@pytest.mark.gpu
def test_build_engines_and_generate_like_onnxruntime(fp16_export, tmp_path):
    _need_tensorrt()
    import kvtrt
    from kvtrt.export.trt import build_engines

    _, directory = fp16_export
    exported = tmp_path / "export"
    shutil.copytree(directory, exported)
    written = build_engines(exported, max_batch=2, prefill_chunk=16, capacity=256, decode_view=256)
    assert set(written) == {"prefill", "decode"}
    llm = kvtrt.load(exported, provider="cuda") if "CUDAExecutionProvider" in _ort_providers() else kvtrt.load(exported)
    trt = kvtrt.load(exported, backend="tensorrt", prefill_chunk=16)
    ids = llm.encode("Once upon a time, in a land far away")
    want = llm.generate(ids, max_new_tokens=16, ignore_eos=True).token_ids
    got = trt.generate(ids, max_new_tokens=16, ignore_eos=True).token_ids
    assert got[:8] == want[:8]  # fp16 on two backends: allow late divergence


def _ort_providers():
    import onnxruntime as ort

    return ort.get_available_providers()
