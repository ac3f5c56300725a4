"""A runtime-only install: `import kvtrt` and running an export import none of the exporter's stack,
and on the CPU a runtime serving dense (full-cache), retrieval (FreeKV, Quest) and compaction requests
does not import torch either: it runs with torch uninstalled.

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
compacted = [llm.generate("Hello world " * 20, max_new_tokens=2, kv=spec).stats.compactions  # policies: numpy
             for spec in ("snapkv:budget=0.5", "kvcrush:budget=0.5,signature=kv", "kvcrush:budget=24,sink=2,window=4")]
report.update(compactions=compacted, torch_after_compaction="torch" in sys.modules)
close = getattr(llm, "close", None)
if close is not None:
    close()
print("REPORT" + json.dumps(report))
"""


def _run(directory, mode: str, stack: tuple[str, ...] = EXPORT_STACK) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(directory), json.dumps(stack), mode],
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
    assert all(n >= 1 for n in report["compactions"]), report["compactions"]
    assert report["torch_after_compaction"] is False  # nor compaction (SnapKV, KVCrush) on the CPU


def test_runtime_works_without_the_export_stack_or_torch_installed(tiny_llama):
    """The same calls with every export-stack module and torch made unimportable (`pip install kvtrt`)."""
    report = _run(tiny_llama[2], "block", EXPORT_STACK + ("torch",))
    assert report["after_generate"] == []
    assert len(report["texts"]) == 3
    assert report["retrieval_engaged"] == [1, 1]
    assert all(n >= 1 for n in report["compactions"]), report["compactions"]


def test_gpu_arrays_without_torch_name_the_extra():
    """A GPU provider keeps its KV in torch tensors: without torch it says which extra to install."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "from kvtrt.runtime.arrays import TorchArrays\n"
              "try:\n    TorchArrays('cuda:0')\nexcept RuntimeError as e:\n    print('ERROR', e)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert "ERROR" in proc.stdout and "pip install 'kvtrt[gpu]'" in proc.stdout, proc.stdout + proc.stderr


def test_runtime_dependencies_exclude_the_exporter():
    """pyproject: `pip install kvtrt` is the runtime; the exporter is the `export` extra, which the
    README's `.[bench]` and `.[test]` installs include."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                          for r in reqs}
    runtime = names(project["dependencies"])
    assert runtime == {"onnxruntime", "numpy", "tokenizers", "tqdm", "jinja2"}  # no torch: the CPU runtime is numpy
    extras = project["optional-dependencies"]
    assert {"torch", "transformers", "gguf", "onnx", "onnx-ir", "accelerate"} <= names(extras["export"])
    for extra in ("gpu", "trt"):  # GPU engines keep the KV in torch tensors
        assert "torch" in names(extras[extra]), extra
    for extra in ("bench", "test", "validate"):
        assert "kvtrt[export]" in extras[extra], extra
