"""`kvtrt validate`: Polygraphy lint + comparison against the PyTorch/HF reference."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest

pytest.importorskip("polygraphy")

from kvtrt.cli import build_parser, command_parsers, main  # noqa: E402
from kvtrt.export import validate as validate_module  # noqa: E402
from kvtrt.export.validate import HF, REFERENCE, validate  # noqa: E402


def test_tiny_export_passes_with_every_case_output_and_reference(tiny_llama, tmp_path):
    model, _, directory = tiny_llama
    report = validate(directory, reference_model=model, save_dir=tmp_path / "val", json_out=tmp_path / "report.json")
    assert report.passed, report.table()
    cases = {c.case for c in report.checks}
    assert cases == {"prefill P=0", "prefill P=12", "decode P=19", "decode P=19 masked", "decode_shared P=19",
                     "decode_shared P=19 masked", "prefill_shared P=0", "prefill_shared P=12"}
    outputs = {c.output for c in report.checks if c.reference == REFERENCE}
    assert {"logits", "key.0", "value.1", "query.1", "score.0", "present_key.0", "present_value.1"} <= outputs
    assert {c.case for c in report.checks if c.reference == HF} == cases - {"decode P=19 masked",
                                                                            "decode_shared P=19 masked"}
    assert all(c.max_abs < 1e-4 for c in report.checks)  # fp32: the graph is the reference's math
    assert all(l.passed for l in report.lint)
    if importlib.util.find_spec("onnx_graphsurgeon") is not None:  # polygraphy lint needs it
        assert [l.skipped for l in report.lint] == [None] * 4
    # polygraphy's own formats, loadable by `polygraphy run --load-inputs/--load-outputs`
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    inputs = load_json(report.files["decode_inputs"])
    assert [feed["past_mask"].shape for feed in inputs] == [(2, 19), (2, 19)]
    assert inputs[1]["past_mask"].min() == 0  # the masked case
    shared = load_json(report.files["decode_shared_inputs"])  # one free slot: the one the step writes
    assert shared[0]["past_mask"].shape == (2, 20) and shared[0]["write_slot"].tolist() == [19, 19]  # one per row
    golden = RunResults.load(report.files["prefill_golden"])
    assert len(golden[REFERENCE]) == 2 and "score.1" in golden[REFERENCE][0]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] and len(data["checks"]) == len(report.checks)
    assert "max abs" in report.table() and "validation PASSED" in report.table()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_pass(tiny_exports, family, tmp_path):
    model, _, directory = tiny_exports[family]
    report = validate(directory, reference_model=model, save_dir=tmp_path, run_lint=False)
    assert report.passed, report.table()


def _perturb(directory, tensor_name: str, scale: float = 1.5) -> None:
    """Scale one weight inside weights.bin (both graphs read the same bytes)."""
    model = onnx.load(str(directory / "decode.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(directory / info["location"], "r+b") as f:
        f.seek(offset)
        data = np.frombuffer(f.read(length), dtype=np.float32).copy()
        data[: data.size // 4] *= scale
        f.seek(offset)
        f.write(data.tobytes())


def test_corrupted_weight_fails_naming_the_outputs(tiny_llama, tmp_path, monkeypatch, capsys):
    model, _, directory = tiny_llama
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    _perturb(broken, "layers_1_qkv_weight_t")
    report = validate(broken, reference_model=model, save_dir=tmp_path / "val", run_lint=False)
    assert not report.passed
    failed = {c.output for c in report.failures}
    # layer 1's projections feed its key/value/query/score and the logits; layer 0 is untouched
    assert {"key.1", "query.1", "logits"} <= failed
    assert not failed & {"key.0", "value.0", "query.0", "score.0"}
    assert "FAILED: prefill output 'key.1'" in report.table()
    # the CLI path exits 1 on failure (reference injected: the tiny model lives in memory)
    monkeypatch.setattr(validate_module, "load_reference", lambda manifest, ref=None: model.float().eval())
    assert main(["validate", str(broken), "--no-lint", "--save-dir", str(tmp_path / "cli"),
                 "--json", str(tmp_path / "cli.json")]) == 1
    out = capsys.readouterr().out
    assert "validation FAILED" in out and "key.1" in out
    assert json.loads((tmp_path / "cli.json").read_text())["passed"] is False


def test_in_memory_export_needs_a_reference(tiny_llama):
    _, _, directory = tiny_llama
    with pytest.raises(ValueError, match="reference_model"):
        validate(directory)


def test_wrong_reference_family_is_refused(tiny_exports):
    with pytest.raises(ValueError, match="the model the export was made from"):
        validate(tiny_exports["llama"][2], reference_model=tiny_exports["qwen2"][0])


def test_help_text():
    text = build_parser().format_help() + command_parsers()["validate"].format_help()
    assert "--json" in text and "--trt-commands" in text and "Polygraphy" in text


@pytest.mark.slow
def test_smollm2_fp32_export_passes(smollm2, tmp_path, capsys):
    model, _, directory = smollm2
    report = validate(directory, reference_model=model, save_dir=tmp_path / "val", json_out=tmp_path / "smol.json")
    with capsys.disabled():
        print("\n" + report.table())
    assert report.passed, report.table()
    # vs kvtrt-torch: 4 cases x all outputs, 2 prefill_shared cases x (logits + 60 buffers + 60 query/score),
    # 2 decode_shared cases x (logits + 60 buffers + 30 queries); 6 x HF logits
    assert len(report.checks) == 4 * (1 + 4 * 30) + 2 * (1 + 4 * 30) + 2 * (1 + 3 * 30) + 6
    assert all(l.passed for l in report.lint)
