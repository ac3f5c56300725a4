"""`kvtrt bench-serve` (kvtrt.eval.concurrency) on the tiny export: the report's structure and its
internal consistency (not its speed), the decode-phase arithmetic on made-up traces, and the
OpenVINO peer when openvino-genai and a converted model are at hand."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import haystack_text
from kvtrt.eval.concurrency import Trace, decode_phase, percentile, run_serve_bench, summarize, table

SPECS = ["full", "kvcrush:budget=0.5,base=snapkv,window=4"]


@pytest.fixture(scope="module")
def report(tiny_llama, tmp_path_factory):
    _, _, directory = tiny_llama
    text = tmp_path_factory.mktemp("texts") / "essays.txt"
    text.write_text(haystack_text(20000))
    return run_serve_bench(directory, concurrency=(1, 2), kv_specs=SPECS, requests_per_c=2, new_tokens=6,
                           prompt_tokens=(40, 90), threads=1, texts=str(text), prefill_chunk=32, probe=True,
                           probe_tokens=200, probe_streams=2, probe_stream_tokens=24, probe_kv=SPECS, isolate=False,
                           progress=False)


def test_report_structure_and_consistency(report):
    rows = report["rows"]
    assert [(r["concurrency"], r["kv"]) for r in rows] == [(c, kv) for c in (1, 2) for kv in SPECS]
    assert report["config"]["requests"] == {1: 2, 2: 4}
    for row in rows:
        assert row["engine"] == "kvtrt" and row["kind"] == "level"
        assert row["decode_attention"] in ("kvtrt", "onnxruntime")
        assert row["requests"] == 2 * row["concurrency"]
        assert row["output_tokens"] == row["requests"] * 6  # EOS ignored: every request its 6 tokens
        assert math.isclose(row["throughput_tok_s"], row["output_tokens"] / row["wall_s"], rel_tol=1e-9)
        for name in ("ttft", "itl", "e2e"):
            assert 0 < row[f"{name}_p50_s"] <= row[f"{name}_p99_s"]
        assert row["ttft_p99_s"] <= row["e2e_p99_s"] <= row["wall_s"] + 1e-9
        assert row["decode_tok_s"] is not None and row["decode_tok_s"] > 0
        assert 1 <= row["decode_batch"] <= row["concurrency"] + 1e-9
        assert 0 < row["decode_time_s"] <= row["wall_s"]
        assert 0 < row["kv_peak_bytes"]
        assert 0 <= row["running_peak"] <= row["concurrency"]  # polled: a tiny run may slip between polls
        assert row["prompt_tokens"] >= 40 * row["requests"]
    assert rows[0]["decode_full_tok_s"] is not None  # C=1: the one request decodes alone
    json.dumps(report)  # the --json output
    text = table(report)
    assert text.count("\n| 1 | kvtrt |") == 2 and "probe prefill s" in text


def test_probe_rows(report):
    assert [p["kv"] for p in report["probes"]] == SPECS
    for p in report["probes"]:
        assert p["kind"] == "probe" and p["streams"] == 2 and p["probe_tokens"] == 200
        assert p["probe_prefill_s"] > 0 and p["prefill_gaps"] >= 1 and p["baseline_gaps"] >= 1
        assert p["prefill_itl_p50_s"] <= p["prefill_itl_p99_s"]
        assert math.isclose(p["p99_over_p50"], p["prefill_itl_p99_s"] / p["prefill_itl_p50_s"])


def test_decode_phase_arithmetic():
    # two requests: A prefills [0, 1), decodes tokens at 1..5; B is admitted at 2, prefills [2, 3),
    # decodes at 3..7 (one token a second)
    a = Trace(prompt_tokens=10, submitted=0.0, admitted=0.0, times=[1.0, 2.0, 3.0, 4.0, 5.0])
    b = Trace(prompt_tokens=10, submitted=0.0, admitted=2.0, times=[3.0, 4.0, 5.0, 6.0, 7.0])
    out = decode_phase([a, b], concurrency=2)
    # no prefill and >= 1 decoding: (1, 2] A alone, (3, 5] both, (5, 7] B alone = 5 s
    assert out["decode_time_s"] == pytest.approx(5.0)
    # tokens after first tokens in those windows: A's 2.0; A 4, 5 + B 4, 5; B 6, 7 -> 7 tokens
    assert out["decode_tok_s"] == pytest.approx(7 / 5)
    assert out["decode_batch"] == pytest.approx((1 + 2 * 2 + 2) / 5)
    assert out["decode_full_tok_s"] == pytest.approx(4 / 2)
    row = summarize([a, b], 2)
    assert row["output_tokens"] == 10 and row["wall_s"] == 7.0
    assert row["ttft_p50_s"] == pytest.approx(2.0) and row["itl_p99_s"] == pytest.approx(1.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None


def test_cli_help_names_every_metric():
    from kvtrt.cli import command_parsers

    text = command_parsers()["bench-serve"].format_help()
    for words in ("aggregate output tok/s", "decode-phase tok/s", "TTFT p50/p99", "inter-token latency",
                  "peak KV bytes", "--kv-memory", "--peer", "--probe-tokens"):
        assert words in text, words


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is None,
                    reason="openvino-genai is not installed (pip install openvino-genai)")
def test_openvino_peer_on_tiny_model(tiny_llama, tmp_path):
    """The peer's level on the tiny model, when optimum-cli can convert it (it is not in the test extra)."""
    from kvtrt.eval.concurrency import openvino_level, openvino_pipeline
    from kvtrt.eval.peers import build_openvino, optimum_cli

    try:
        optimum_cli()
    except RuntimeError as error:
        pytest.skip(str(error))
    model, tokenizer, directory = tiny_llama
    out = build_openvino(directory, tmp_path / "ov", hf=(model, tokenizer))
    pipe = openvino_pipeline(str(out), "full-f32", threads=1, budget=64, prefill_chunk=32, max_batch=4)
    prompts = [[5 + (i * 7 + j) % 250 for j in range(30 + 10 * i)] for i in range(4)]
    row = openvino_level(pipe, prompts, 2, 5)
    assert row["output_tokens"] == 20 and row["requests"] == 4
    assert row["ttft_p50_s"] <= row["ttft_p99_s"] and row["itl_p50_s"] <= row["itl_p99_s"]
