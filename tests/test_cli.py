"""The command line on a tiny export: every command runs, writes what it says, fails clearly."""

from __future__ import annotations

import json

import pytest

from kvtrt.cli import command_options, command_parsers, main

from conftest import haystack_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "essay.txt"
    path.write_text(haystack_text(20000))
    return path


def test_every_option_has_help():
    parsers = command_parsers()
    assert {"export", "generate", "bench", "eval", "validate", "build-engine", "quantize"} <= set(parsers)
    for name, sub in parsers.items():
        for action in command_options(sub):
            assert action.help, f"kvtrt {name} {action.dest} has no help"


def test_generate_streams_and_reports(tiny_llama, capsys):
    _, _, directory = tiny_llama
    assert main(["generate", str(directory), "--prompt", "Hello", "--max-new-tokens", "12",
                 "--kv", "streaming:sink=2,window=6", "--compare-full"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "time to first token" in err and "decode" in err and "KV held" in err
    assert "saved:" in err


def test_generate_errors_name_the_fix(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "kvtrt export" in capsys.readouterr().err


def test_eval_writes_rows_and_plot(tiny_llama, text_file, tmp_path, capsys):
    _, _, directory = tiny_llama
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert main(["eval", str(directory), "--task", "ppl,agreement", "--kv", "snapkv", "--kv", "kvcrush:base=snapkv",
                 "--budget", "0.25,0.5", "--context", "200", "--new-tokens", "16", "--texts", str(text_file),
                 "--num-texts", "1", "--json", str(out_json), "--plot", str(out_png)]) == 0
    rows = json.loads(out_json.read_text())
    assert {(r["task"], r["kv"]) for r in rows} >= {("ppl", "full"), ("ppl", "snapkv:budget=0.25"),
                                                   ("agreement", "kvcrush:base=snapkv,budget=0.5")}
    for row in rows:
        assert {"task", "kv", "budget", "context", "metric", "value", "full_value"} <= set(row)
    full = next(r for r in rows if r["task"] == "agreement" and r["kv"] == "full")
    assert full["value"] == 1.0
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_eval_baseline_reports_the_other_exports_full_cache(tiny_exports, text_file, tmp_path, capsys):
    """--baseline: ppl rows carry the baseline export's full-cache perplexity on the same samples
    (here an int4 copy evaluated against its float export), and exports that tokenize differently
    are refused."""
    import shutil

    from kvtrt.export.quantize import quantize_export

    _, _, directory = tiny_exports["llama"]
    int4 = tmp_path / "int4"
    shutil.copytree(directory, int4)
    quantize_export(int4)
    common = ["--task", "ppl", "--kv", "snapkv", "--budget", "0.5", "--context", "120", "--new-tokens", "16",
              "--texts", str(text_file), "--num-texts", "1"]
    assert main(["eval", str(directory), *common, "--json", str(tmp_path / "float.json")]) == 0
    assert main(["eval", str(int4), *common, "--baseline", str(directory), "--json", str(tmp_path / "q.json")]) == 0
    float_full = next(r for r in json.loads((tmp_path / "float.json").read_text()) if r["kv"] == "full")
    rows = json.loads((tmp_path / "q.json").read_text())
    for row in rows:
        assert row["baseline_value"] == pytest.approx(float_full["value"], rel=1e-5)
    assert rows[0]["value"] != pytest.approx(float_full["value"], rel=1e-6)  # int4 is a different model
    assert "vs baseline" in capsys.readouterr().err
    other = tmp_path / "other-tokenizer"  # same model, two byte tokens' ids swapped
    shutil.copytree(directory, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["T"], vocab["h"] = vocab["h"], vocab["T"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert main(["eval", str(int4), *common, "--baseline", str(other)]) == 2
    assert "tokenizes differently" in capsys.readouterr().err


def test_eval_baseline_agreement_and_needle(tiny_exports, text_file, tmp_path):
    """--baseline on agreement and needle: an export against itself agrees on every token, an int4
    copy of it on fewer (a different model); needle rows carry the baseline's accuracy (the random
    tiny model finds no needle, so only its presence and range are checked here)."""
    import shutil

    from kvtrt.export.quantize import quantize_export

    _, _, directory = tiny_exports["llama"]
    int4 = tmp_path / "int4"
    shutil.copytree(directory, int4)
    quantize_export(int4)
    common = ["--task", "agreement,needle", "--kv", "snapkv", "--budget", "0.5", "--context", "400",
              "--new-tokens", "24", "--texts", str(text_file), "--num-texts", "2", "--depths", "0.5"]
    for export, name in ((directory, "self"), (int4, "int4")):
        assert main(["eval", str(export), *common, "--baseline", str(directory),
                     "--json", str(tmp_path / f"{name}.json")]) == 0
    rows = {name: {(r["task"], r["kv"]): r for r in json.loads((tmp_path / f"{name}.json").read_text())}
            for name in ("self", "int4")}
    assert rows["self"][("agreement", "full")]["baseline_value"] == 1.0
    assert rows["int4"][("agreement", "full")]["baseline_value"] < 1.0
    for name in ("self", "int4"):
        assert 0 <= rows[name][("needle", "full")]["baseline_value"] <= 1


def test_eval_needle_refuses_a_context_without_room_for_the_haystack(tiny_llama, text_file, capsys):
    _, _, directory = tiny_llama
    assert main(["eval", str(directory), "--task", "needle", "--kv", "full", "--context", "100",
                 "--texts", str(text_file), "--num-texts", "1", "--depths", "0.5"]) == 2
    assert "haystack around the needle" in capsys.readouterr().err


def test_eval_peer_reports_onnxruntime_genai_perplexity(tiny_llama, text_file, tmp_path, capsys):
    """--peer ortgenai: ppl rows carry onnxruntime-genai's teacher-forced perplexity on the same
    samples; a peer built from the same fp32 weights matches kvtrt's full cache, one built from
    other weights does not."""
    pytest.importorskip("onnxruntime_genai", reason="the peer needs the bench extra (onnxruntime-genai)")
    from kvtrt.eval.peers import build_ortgenai
    from tiny import tiny_model, tiny_tokenizer

    model, tokenizer, directory = tiny_llama
    same = build_ortgenai(str(directory), tmp_path / "same", "fp32", hf=(model, tokenizer))
    other = build_ortgenai(str(directory), tmp_path / "other", "fp32", hf=(tiny_model("llama", seed=1), tokenizer))
    common = ["--task", "ppl", "--kv", "snapkv", "--budget", "0.5", "--context", "120", "--new-tokens", "16",
              "--texts", str(text_file), "--num-texts", "2", "--peer", "ortgenai"]
    assert main(["eval", str(directory), *common, "--peer-dir", str(same), "--json", str(tmp_path / "s.json")]) == 0
    assert "vs peer" in capsys.readouterr().err
    rows = json.loads((tmp_path / "s.json").read_text())
    full = next(r for r in rows if r["kv"] == "full")
    assert all(r["peer"] == str(same) for r in rows)
    assert full["peer_value"] == pytest.approx(full["value"], rel=1e-4)
    assert main(["eval", str(directory), *common, "--peer-dir", str(other), "--json", str(tmp_path / "o.json")]) == 0
    full_other = next(r for r in json.loads((tmp_path / "o.json").read_text()) if r["kv"] == "full")
    assert full_other["value"] == pytest.approx(full["value"], rel=1e-9)
    assert abs(full_other["peer_value"] / full["value"] - 1) > 0.05


def test_bench_writes_rows_and_plot(tiny_llama, text_file, tmp_path):
    _, _, directory = tiny_llama
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", str(directory), "--context", "64,200", "--new-tokens", "8", "--kv", "full",
                 "--kv", "freekv:budget=100,page=8,window=16", "--kv", "snapkv:budget=0.2,window=4",
                 "--text", str(text_file), "--repeat", "1", "--json", str(out_json), "--plot", str(out_png)]) == 0
    rows = json.loads(out_json.read_text())
    assert len(rows) == 6  # a fractional budget measures too (its 16-token warm-up keeps everything)
    kv = {(r["context"], r["kv"]): r["kv_mib"] for r in rows}
    assert kv[200, "snapkv:budget=0.2,window=4"] < kv[200, "full"] / 2
    for row in rows:
        assert {"context", "engine", "prefill_s", "ttft_s", "decode_tok_s", "peak_rss_mib", "kv_mib"} <= set(row)
        assert row["decode_tok_s"] > 0 and row["peak_rss_mib"] > 0
        assert 0 < row["ttft_s"] <= row["prefill_s"] + 0.5  # the first token comes before a FreeKV pool's build
        assert row["decode_attention"] in ("kvtrt", "onnxruntime")  # which decode attention the row measured
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_bench_peak_rss_is_the_workers_own():
    """A bench worker reports its own peak memory, not the (large) parent's it was forked from."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)  # the parent holds 600 MiB when it spawns the worker
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page
    out = subprocess.run([sys.executable, "-c", "from kvtrt.eval.bench import peak_rss_mib; print(peak_rss_mib())"],
                         capture_output=True, text=True, check=True).stdout
    assert 5 < float(out) < 500
    del ballast


def test_bench_refuses_context_past_positions(tiny_llama, text_file, capsys):
    _, _, directory = tiny_llama
    assert main(["bench", str(directory), "--context", "600", "--text", str(text_file)]) == 2
    assert "positions" in capsys.readouterr().err


@pytest.mark.parametrize("command, module, extra", [
    (["validate", "--no-lint"], "polygraphy", "validate"),
    (["validate", "--trt-commands", "OUT/trt-commands"], "polygraphy", "validate"),
    (["bench", "--context", "64", "--plot", "OUT/bench.png"], "matplotlib", "bench"),
    (["eval", "--kv", "snapkv", "--peer", "ortgenai"], "onnxruntime_genai", "bench"),
    (["build-engine", "-o", "OUT/engines"], "tensorrt", "trt"),
])
def test_a_missing_extra_fails_at_once_with_the_install_command(tiny_llama, tmp_path, monkeypatch, capsys, command,
                                                                module, extra):
    """A command whose optional extra is not installed exits 2 before any work, naming the pip command."""
    import sys

    import kvtrt.eval.accuracy
    import kvtrt.eval.bench
    import kvtrt.eval.peers
    import kvtrt.export.trt
    import kvtrt.export.validate

    _, _, directory = tiny_llama
    monkeypatch.setitem(sys.modules, module, None)  # importlib.util.find_spec now says: not installed
    calls = []
    for owner, name in ((kvtrt.export.validate, "validate"), (kvtrt.export.validate, "load_reference"),
                        (kvtrt.export.trt, "write_trt_commands"), (kvtrt.export.trt, "build_engines"),
                        (kvtrt.eval.bench, "run_bench"), (kvtrt.eval.peers, "build_ortgenai"),
                        (kvtrt.eval.accuracy, "Evaluator")):
        monkeypatch.setattr(owner, name, lambda *a, name=name, **k: calls.append(name))
    argv = [command[0], str(directory), *(w.replace("OUT", str(tmp_path)) for w in command[1:])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"pip install 'kvtrt[{extra}]'" in err and module in err
    assert calls == [] and list(tmp_path.iterdir()) == []  # nothing ran, nothing was written
