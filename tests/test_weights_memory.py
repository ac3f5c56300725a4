"""One copy of the weights per process: a runtime with every graph of its export loaded holds the
weights once (issue 14). Measured in a fresh subprocess so other tests' memory does not count:
resident memory after `OrtEngine(dir)` with all graphs minus resident memory right before it
(kvtrt, torch and onnxruntime already imported) must stay within

    1.2 x the size of weights.bin + OVERHEAD_MIB

where OVERHEAD_MIB covers what is not weights: ORT's C library (loaded beside its Python
extension), each graph's session (graph, kernels, plans) and the allocator arenas. Before the
change every session prepacked its own copy (SmolLM2 fp32, four graphs: ~2.5 GB for 519 MiB of
weights; two graphs: ~1.3 GB)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

OVERHEAD_MIB = 64  # measured growth after malloc_trim: tiny llama 92 MiB for 61 MiB of weights, SmolLM2 572 for 519

_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime, torch
    import kvtrt
    from kvtrt.runtime import engine as engine_module
    from kvtrt.runtime.memory import return_freed_memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    directory, share = sys.argv[1], sys.argv[2] == "1"
    engine_module.SHARE_WEIGHTS = share
    before = rss_mib()
    engine = engine_module.OrtEngine(directory, threads=1)
    return_freed_memory()  # what the sessions hold, not the heap their graph optimizations freed
    after = rss_mib()
    llm = kvtrt.load(directory, threads=1)  # a runtime on top still decodes (sessions of its own)
    text = llm.generate("The capital of France is", max_new_tokens=4).text
    print("KVTRT_RSS " + json.dumps({"before": before, "after": after, "graphs": sorted(engine.sessions),
                                     "shared": engine._shared is not None, "text": text}))
""")


def rss_after_load(directory: Path, share: bool = True) -> dict:
    """RSS (MiB) right before and after an OrtEngine loads every graph of `directory`, in a subprocess."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(directory), "1" if share else "0"],
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("KVTRT_RSS "):
            return json.loads(line[len("KVTRT_RSS "):])
    raise AssertionError(f"probe failed:\n{proc.stderr[-3000:]}")


def check_one_copy(directory: Path) -> dict:
    weights_mib = (directory / "weights.bin").stat().st_size / 2**20
    m = rss_after_load(directory)
    grown = m["after"] - m["before"]
    assert m["shared"], "the engine fell back to one Python session per graph"
    assert len(m["graphs"]) >= 2
    assert grown <= 1.2 * weights_mib + OVERHEAD_MIB, (
        f"loading {m['graphs']} grew RSS by {grown:.0f} MiB for {weights_mib:.0f} MiB of weights "
        f"(limit 1.2x + {OVERHEAD_MIB} MiB = {1.2 * weights_mib + OVERHEAD_MIB:.0f} MiB)")
    return {**m, "grown": grown, "weights_mib": weights_mib}


@pytest.fixture(scope="module")
def weighty_tiny(tmp_path_factory):
    """A tiny llama wide enough (61 MiB of fp32 weights) for a second copy to stand out of the
    per-session overhead."""
    from kvtrt.export import export_model
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4)
    directory = tmp_path_factory.mktemp("tiny-weighty")
    export_model((model, tiny_tokenizer()), directory, progress=False, score_window=4)
    return directory


def test_tiny_runtime_holds_weights_once(weighty_tiny):
    m = check_one_copy(weighty_tiny)
    assert set(m["graphs"]) == {"prefill", "decode", "decode_heads", "prefill_shared", "decode_shared"}
    # the probe discriminates: one session per graph (the old way) holds a copy per graph and
    # breaks the bound (measured 259 MiB against 92, both after malloc_trim)
    old = rss_after_load(weighty_tiny, share=False)
    assert not old["shared"]
    assert old["after"] - old["before"] > max(2 * m["weights_mib"], 1.2 * m["weights_mib"] + OVERHEAD_MIB)
    assert old["text"] == m["text"]  # same graphs, same greedy tokens


@pytest.mark.slow
def test_smollm2_runtime_holds_weights_once(smollm2):
    _, _, directory = smollm2
    m = check_one_copy(Path(directory))
    assert set(m["graphs"]) == {"prefill", "decode", "decode_heads", "prefill_shared", "decode_shared"}
