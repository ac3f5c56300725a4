"""A runtime-only install: `import kvtrt` and running an export import none of the exporter's stack,
and a runtime serving dense (full-cache) and retrieval (FreeKV, Quest) requests does not import torch
either.

Each check runs in a fresh interpreter (this test process has transformers loaded already).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

#: the `export`, `validate`, `trt` and `bench` extras' modules: a runtime-only install has none of them
EXPORT_STACK = ("transformers", "accelerate", "gguf", "onnx", "onnx_ir", "onnxscript", "polygraphy",
                "onnx_graphsurgeon", "tensorrt", "safetensors", "matplotlib", "onnxruntime_genai")
#: kvtrt's own packages that need that stack
EXPORT_PACKAGES = ("kvtrt.export", "kvtrt.models", "kvtrt.plugins", "kvtrt.eval", "kvtrt.cli")

SCRIPT = r"""
import json, sys
stack, block = json.loads(sys.argv[2]), sys.argv[3] == "block"
if block:  # as if not installed: `import x` raises ImportError, importlib.util.find_spec(x) is None
    for name in stack:
        sys.modules[name] = None
loaded = lambda: sorted(m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in stack)
ours = lambda: sorted(m for m in sys.modules if m.startswith("kvtrt."))
import kvtrt
report = {"after_import": loaded(), "kvtrt_after_import": ours()}
llm = kvtrt.load(sys.argv[1])
report["after_load"] = loaded()
texts = [llm.generate("Hello", max_new_tokens=4).text,
         "".join(llm.stream("Hello", max_new_tokens=4, stop=["zz"])),
         llm.generate([{"role": "user", "content": "Hi 😀"}], max_new_tokens=3).text]
report.update(after_generate=loaded(), kvtrt_after_generate=ours(), texts=texts)
report["torch_after_dense"] = "torch" in sys.modules  # the full cache's path is numpy only
for spec in ("freekv:budget=32,page=4,sink=4,window=8,min_context=0", "quest:budget=32,page=4,sink=4,window=8,min_context=0"):
    result = llm.generate("Hello world " * 20, max_new_tokens=3, kv=spec)  # computes in numpy on the CPU
    report.setdefault("retrieval_engaged", []).append(result.stats.kv.get("retrieval_engaged"))
report["torch_after_retrieval"] = "torch" in sys.modules
if sys.argv[3] == "inspect":  # a compaction request brings torch (its policies compute in torch)
    llm.generate("Hello world " * 20, max_new_tokens=2, kv="snapkv:budget=0.5")
    report["torch_after_compaction"] = "torch" in sys.modules
close = getattr(llm, "close", None)
if close is not None:
    close()
print("REPORT" + json.dumps(report))
"""


def _run(directory, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(directory), json.dumps(EXPORT_STACK), mode],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def test_runtime_imports_none_of_the_export_stack(tiny_llama):
    report = _run(tiny_llama[2], "inspect")
    assert report["after_import"] == []
    assert report["after_load"] == []
    assert report["after_generate"] == []
    for key in ("kvtrt_after_import", "kvtrt_after_generate"):
        assert not [m for m in report[key] if m.startswith(EXPORT_PACKAGES)], report[key]
    assert all(isinstance(t, str) for t in report["texts"])
    assert report["torch_after_dense"] is False  # ~190 MiB and ~1.3 s a dense-only runtime never pays
    assert report["retrieval_engaged"] == [1, 1]
    assert report["torch_after_retrieval"] is False  # nor one serving FreeKV / Quest on the CPU
    assert report["torch_after_compaction"] is True


def test_runtime_works_without_the_export_stack_installed(tiny_llama):
    """The same calls with every export-stack module made unimportable (a runtime-only install)."""
    report = _run(tiny_llama[2], "block")
    assert report["after_generate"] == []
    assert len(report["texts"]) == 3


def test_runtime_dependencies_exclude_the_exporter():
    """pyproject: `pip install kvtrt` is the runtime; the exporter is the `export` extra, which the
    README's `.[bench]` and `.[test]` installs include."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                          for r in reqs}
    runtime = names(project["dependencies"])
    assert runtime == {"torch", "onnxruntime", "numpy", "tokenizers", "tqdm", "jinja2"}
    extras = project["optional-dependencies"]
    assert {"transformers", "gguf", "onnx", "onnx-ir", "accelerate"} <= names(extras["export"])
    for extra in ("bench", "test", "validate"):
        assert "kvtrt[export]" in extras[extra], extra
