"""OpenVINO GenAI as a side-by-side peer: `kvtrt eval --peer openvino` (agreement, needle) and
`kvtrt bench --peer openvino` (LLMPipeline, u8 and f32 KV).

The command-line checks and the eviction sizing run everywhere. The runs need openvino-genai and an
OpenVINO conversion of a kvtrt export's model (optimum-intel converts it once; CI has none), so they
skip without them, saying why. Point them at a pair with

    KVTRT_TEST_EXPORT=/tmp/smol KVTRT_TEST_OPENVINO_DIR=/tmp/smol-openvino-fp32 python -m pytest tests/test_openvino_peer.py

(defaults: the SmolLM2 export the slow tests cache, $KVTRT_TEST_CACHE or .pytest_cache/kvtrt-smollm2, and
its DIR-openvino-fp32 beside it, as `kvtrt eval/bench --peer openvino` converts it there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import haystack_text
from kvtrt.cli import build_parser, command_parsers, main
from kvtrt.eval.peers import OPENVINO_BLOCK, openvino_counterpart, openvino_directory
from kvtrt.runtime.kv.options import KVSpecError
from kvtrt.runtime.kv.spec import parse_kv_spec

CONTEXT = 256  # tokens: budget 0.5 -> 128, OpenVINO's smallest SnapKV cache (start 32 + recent 32 + one block)
NEW_TOKENS = 12


def _needs_openvino() -> None:
    if importlib.util.find_spec("openvino_genai") is None:
        pytest.skip("openvino-genai is not installed (pip install 'kvtrt[bench]')")


@pytest.fixture(scope="module")
def models() -> tuple[str, str]:
    """(kvtrt export, its OpenVINO conversion), or a skip naming what is missing."""
    _needs_openvino()
    cache = Path(os.environ.get("KVTRT_TEST_CACHE", Path(__file__).resolve().parents[1] / ".pytest_cache"))
    export = os.environ.get("KVTRT_TEST_EXPORT") or str(cache / "kvtrt-smollm2")
    if not (Path(export) / "manifest.json").is_file():
        pytest.skip(f"no kvtrt export at {export}: set KVTRT_TEST_EXPORT to one (e.g. `kvtrt export -o DIR`)")
    converted = openvino_directory(export, os.environ.get("KVTRT_TEST_OPENVINO_DIR"))
    if not (Path(converted) / "openvino_model.xml").is_file():
        pytest.skip(f"no OpenVINO model at {converted}: convert it once (`kvtrt eval {export} --peer openvino "
                    f"--task agreement ...` with optimum-cli installed) or set KVTRT_TEST_OPENVINO_DIR to one")
    return export, converted


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("texts") / "essays.txt"
    path.write_text(haystack_text(20000))
    return str(path)


# -- the command line (no OpenVINO needed) ---------------------------------------------------------------
@pytest.mark.parametrize("tasks", ["ppl", "agreement,ppl"])
def test_eval_refuses_ppl_with_the_openvino_peer(tmp_path, monkeypatch, capsys, tasks):
    """Perplexity needs the logits of given targets, which OpenVINO GenAI's pipelines do not return: the
    command says so and stops before converting or loading anything (installed or not)."""
    import kvtrt.eval.accuracy
    import kvtrt.eval.peers

    calls = []
    monkeypatch.setattr(kvtrt.eval.peers, "build_openvino", lambda *a, **k: calls.append("build"))
    monkeypatch.setattr(kvtrt.eval.accuracy, "Evaluator", lambda *a, **k: calls.append("load"))
    assert main(["eval", str(tmp_path), "--kv", "snapkv", "--peer", "openvino", "--task", tasks]) == 2
    err = capsys.readouterr().err
    assert "--peer openvino cannot score perplexity" in err and "--task agreement,needle" in err
    assert calls == []


@pytest.mark.parametrize("command", [
    ["eval", "--kv", "snapkv", "--task", "agreement", "--peer", "openvino"],
    ["bench", "--context", "64", "--peer", "openvino"],
    ["bench", "--context", "64", "--peer", "ortgenai,openvino"],
])
def test_a_missing_openvino_genai_fails_at_once_with_the_install_command(tmp_path, monkeypatch, capsys, command):
    import kvtrt.eval.accuracy
    import kvtrt.eval.bench
    import kvtrt.eval.peers

    monkeypatch.setitem(sys.modules, "openvino_genai", None)  # importlib.util.find_spec now says: not installed
    calls = []
    for owner, name in ((kvtrt.eval.peers, "build_openvino"), (kvtrt.eval.accuracy, "Evaluator"),
                        (kvtrt.eval.bench, "run_bench")):
        monkeypatch.setattr(owner, name, lambda *a, name=name, **k: calls.append(name))
    assert main([command[0], str(tmp_path), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "openvino_genai" in err and "pip install 'kvtrt[bench]'" in err
    assert calls == []


# -- the conversion (converters faked: no optimum-cli or OpenVINO needed) ---------------------------------
def _fake_converters(monkeypatch, fail_tokenizer: bool, seen: dict):
    """subprocess.run as optimum-cli (writes the IR and, like it, its own tokenizer files) and as the
    tokenizer converter (records the tokenizer.json it was given; fails when `fail_tokenizer`)."""
    import subprocess

    import kvtrt.eval.peers as peers

    def run(cmd, check=True, **kwargs):
        out = Path(cmd[-1])
        if "export" in cmd:  # optimum-cli export openvino ... OUT
            for name in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml"):
                (out / name).write_text("optimum's")
            return subprocess.CompletedProcess(cmd, 0)
        seen["tokenizer"] = json.loads((Path(cmd[-4]) / "tokenizer.json").read_text(encoding="utf-8"))
        if fail_tokenizer:
            raise subprocess.CalledProcessError(1, cmd)
        for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            (out / name).write_text("converted")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(peers.subprocess, "run", run)
    monkeypatch.setattr(peers, "optimum_cli", lambda: "optimum-cli")
    monkeypatch.setattr(peers, "save_plain_hf", lambda model, tokenizer, folder: None)


def test_a_failed_openvino_conversion_leaves_nothing_that_looks_converted(tiny_llama, tmp_path, monkeypatch):
    """optimum-cli writes its own tokenizer files before kvtrt converts the tokenizer; when that step fails,
    the folder must not pass for a finished conversion (the next run would use optimum's unusable
    tokenizer). The conversion is built aside and moved into place only when complete."""
    from kvtrt.eval.peers import build_openvino

    _, _, directory = tiny_llama
    out = tmp_path / "ov"
    _fake_converters(monkeypatch, fail_tokenizer=True, seen={})
    with pytest.raises(Exception):
        build_openvino(directory, out, hf=(None, None))
    assert not out.exists()
    _fake_converters(monkeypatch, fail_tokenizer=False, seen={})
    assert build_openvino(directory, out, hf=(None, None)) == out
    assert (out / "openvino_tokenizer.xml").read_text() == "converted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov"]  # nothing partial left beside it


def test_the_tokenizer_converter_gets_the_byte_level_decoder(tiny_llama, tmp_path, monkeypatch):
    """transformers' GGUF conversion writes a decoder that mixes sentencepiece steps with ByteLevel, on
    which openvino-tokenizers' converter fails; it is given the ByteLevel step alone, and the rest of the
    export's tokenizer.json unchanged."""
    from kvtrt.eval.peers import build_openvino, converter_decoder
    from kvtrt.manifest import Manifest

    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    mixed = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                              {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                              byte_level]}
    assert converter_decoder(mixed) == byte_level
    sentencepiece = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    assert converter_decoder(sentencepiece) == sentencepiece and converter_decoder(None) is None

    _, _, directory = tiny_llama
    export = tmp_path / "export"
    import shutil
    shutil.copytree(directory, export)
    tokenizer_file = export / Manifest.load(export).tokenizer_file
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    spec["decoder"] = mixed
    tokenizer_file.write_text(json.dumps(spec), encoding="utf-8")
    seen = {}
    _fake_converters(monkeypatch, fail_tokenizer=False, seen=seen)
    build_openvino(str(export), tmp_path / "ov", hf=(None, None))
    assert seen["tokenizer"]["decoder"] == byte_level
    assert {k: v for k, v in seen["tokenizer"].items() if k != "decoder"} == \
        {k: v for k, v in spec.items() if k != "decoder"}


def test_help_explains_the_openvino_peer():
    parsers = command_parsers()
    text = " ".join(parsers["eval"].format_help().split())
    for words in ("openvino", "--openvino-dir", "SnapKV", "KVCrush", "32-token blocks", "peer_budget",
                  "cannot run --task ppl", "f32 KV", "same prompt token ids"):
        assert words in text, words
    text = " ".join(parsers["bench"].format_help().split())
    for words in ("LLMPipeline", "u8", "KV_CACHE_PRECISION=f32", "full-u8", "full-f32", "INFERENCE_NUM_THREADS",
                  "--openvino-dir", "comma-separated or repeated"):
        assert words in text, words


def test_bench_peer_takes_a_list():
    parse = build_parser().parse_args
    assert parse(["bench", "d", "--peer", "ortgenai"]).peer == ["ortgenai"]
    assert parse(["bench", "d", "--peer", "ortgenai,openvino"]).peer == ["ortgenai", "openvino"]
    assert parse(["bench", "d", "--peer", "openvino", "--peer", "ortgenai"]).peer == ["openvino", "ortgenai"]
    assert parse(["bench", "d"]).peer is None
    with pytest.raises(SystemExit):
        parse(["bench", "d", "--peer", "ortgenai,vllm"])


# -- the eviction counterpart (no OpenVINO needed) ---------------------------------------------------------
@pytest.mark.parametrize("context", [256, 1000, 4096, 7680])
@pytest.mark.parametrize("spec", ["snapkv", "kvcrush:base=snapkv", "kvcrush:base=snapkv,ratio=0.5,anchor=mean"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_counterpart_keeps_whole_blocks_within_kvtrts_budget(context, spec, fraction):
    run = parse_kv_spec(f"{spec}{',' if ':' in spec else ':'}budget={fraction}")
    if fraction * context < 36:  # kvtrt itself refuses a budget below sink + window
        with pytest.raises(KVSpecError):
            openvino_counterpart(run, context)
        return
    keep = run.compaction.budget_tokens(context)
    eviction = openvino_counterpart(run, context)
    assert eviction.mode == spec.split(":")[0]
    assert eviction.tokens % OPENVINO_BLOCK == 0 and eviction.max_cache_size % OPENVINO_BLOCK == 0
    smallest = eviction.start + eviction.recent + OPENVINO_BLOCK + eviction.crush_blocks * OPENVINO_BLOCK
    if keep >= smallest:  # else it has no counterpart (eval says so in the row)
        assert keep - OPENVINO_BLOCK < eviction.tokens <= keep
    if eviction.mode == "kvcrush":
        ratio = run.compaction.ratio
        assert eviction.crush_blocks >= 1 and eviction.anchor == run.compaction.anchor
        assert abs(eviction.crush_blocks * OPENVINO_BLOCK - ratio * eviction.tokens) <= OPENVINO_BLOCK
    assert (eviction.start, eviction.recent, eviction.snapkv_window) == (32, 32, 32)  # sink 4, window 32


@pytest.mark.parametrize("spec", ["h2o:budget=0.25", "streaming:budget=0.25", "kvcrush:budget=0.25,base=h2o",
                                  "freekv:budget=1024", "snapkv:budget=0.25+freekv:budget=512", "full"])
def test_specs_without_an_openvino_counterpart(spec):
    assert openvino_counterpart(parse_kv_spec(spec), 4096) is None


# -- the runs (openvino-genai and a converted model) -----------------------------------------------------
@pytest.fixture(scope="module")
def evaluator(models, text_file):
    from kvtrt.eval.accuracy import Evaluator

    export, converted = models
    return Evaluator(export, CONTEXT, texts=text_file, num_texts=1, threads=2, progress=False, openvino=converted)


def test_eval_rows_carry_openvino_full_cache_and_eviction(evaluator, monkeypatch):
    """Through the eval path: the peer's full-cache greedy tokens equal kvtrt's (f32 KV), the eviction
    rows name its SnapKV / KVCrush at a whole-block budget within kvtrt's, and a budget below its
    smallest cache has no counterpart."""
    from kvtrt.eval.accuracy import expand_specs, table
    from kvtrt.eval.decoding import decode

    seen = []
    generate = evaluator.openvino.generate

    def spy(prompts, new_tokens, eviction=None, stop_ids=None):
        out = generate(prompts, new_tokens, eviction, stop_ids)
        seen.append((eviction, prompts, out))
        return out

    monkeypatch.setattr(evaluator.openvino, "generate", spy)
    runs = expand_specs(["snapkv", "kvcrush:base=snapkv", "h2o"], [0.5]) + expand_specs(["snapkv"], [64])
    rows = evaluator.run("agreement", runs, new_tokens=NEW_TOKENS)
    by_kv = {r["kv"]: r for r in rows}

    full_calls = [(prompts, out) for eviction, prompts, out in seen if eviction is None]
    assert len(full_calls) == 1 and len(full_calls[0][0]) == 1
    prompt, peer_tokens = full_calls[0][0][0], full_calls[0][1][0]
    assert len(prompt) == CONTEXT and len(peer_tokens) == NEW_TOKENS
    assert peer_tokens == decode(evaluator.llm, prompt, NEW_TOKENS, "full").tokens

    assert by_kv["full"]["peer_full_value"] == by_kv["full"]["peer_value"] == 1.0
    assert by_kv["full"]["peer"].startswith("openvino-genai ") and by_kv["full"]["peer"].endswith("full cache")
    for kv, name in (("snapkv:budget=0.5", "SnapKV("), ("kvcrush:base=snapkv,budget=0.5", "KVCrush(")):
        row = by_kv[kv]
        assert name in row["peer"] and 0.0 <= row["peer_value"] <= 1.0
        assert row["peer_full_value"] == 1.0
        assert row["peer_budget"] % OPENVINO_BLOCK == 0 and row["peer_budget"] <= CONTEXT // 2
    assert sorted(e.mode for e, _, _ in seen if e is not None) == ["kvcrush", "snapkv"]
    for kv in ("h2o:budget=0.5", "snapkv:budget=64"):  # none in OpenVINO; below its smallest SnapKV cache (128)
        assert "no counterpart" in by_kv[kv]["peer"] and "peer_value" not in by_kv[kv]
    assert "no counterpart at 64 tokens" in by_kv["snapkv:budget=64"]["peer_note"]
    assert "openvino-genai tokens kept" in table(rows)


def test_needle_stops_at_eos_like_kvtrt(evaluator):
    """Needle answers end at EOS in both engines: the peer's full-cache answer is kvtrt's."""
    from kvtrt.eval.decoding import decode

    prompt, payload = evaluator._jobs("needle", None, [0.5])[0]
    stop = list(evaluator.llm.manifest.eos_token_ids)
    peer = evaluator.openvino.generate([prompt], payload["new"], stop_ids=stop)[0]
    ours = decode(evaluator.llm, prompt, payload["new"], "full", stop_at_eos=True).tokens
    assert peer == ours and len(peer) <= payload["new"]


def test_bench_reports_openvino_with_u8_and_f32_kv(models, text_file, tmp_path, capsys):
    export, converted = models
    out = tmp_path / "bench.json"
    assert main(["bench", export, "--context", "128", "--new-tokens", "8", "--peer", "openvino", "--openvino-dir",
                 converted, "--text", text_file, "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["engine"], r["kv"]) for r in rows] == [("kvtrt", "full"), ("openvino", "full-u8"),
                                                      ("openvino", "full-f32")]
    for row in rows:
        assert row["prefill_s"] > 0 and row["decode_tok_s"] > 0 and row["peak_rss_mib"] > 0 and row["kv_mib"] > 0
    u8, f32 = rows[1], rows[2]
    assert (u8["kv_precision"], f32["kv_precision"]) == ("u8", "f32") and u8["kv_mib"] < f32["kv_mib"]
    assert u8["new_tokens"] == f32["new_tokens"] == 8
    text = capsys.readouterr().out
    assert "decode vs openvino full-u8" in text and "decode vs openvino full-f32" in text
