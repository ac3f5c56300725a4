"""Peak RSS against context for fp32 and fp16 KV caches (kv_dtype_bench.json, pass b; peers from pass a).

    python docs/results/kv_dtype_plot.py   # writes kv_dtype_rss.png beside this file"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
runs = json.loads((here / "kv_dtype_bench.json").read_text())
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
for ax, weights in zip(axes, ("fp32", "int4")):
    for kv_dtype, style in (("kv32", "-"), ("kv16", "--")):
        rows = runs[f"{weights}_{kv_dtype}_b"]
        for kv, color in (("full", "tab:blue"), ("freekv:budget=1024", "tab:orange")):
            pts = sorted((r["context"], r["peak_rss_mib"]) for r in rows if r["kv"] == kv and r["engine"] == "kvtrt")
            ax.plot(*zip(*pts), style, color=color, marker="o",
                    label=f"{kv}, {'fp16' if kv_dtype == 'kv16' else 'fp32'} KV")
    peer = sorted((r["context"], r["peak_rss_mib"]) for r in runs[f"{weights}_kv32_a"] if r["engine"] == "ortgenai")
    ax.plot(*zip(*peer), ":", color="gray", marker="s", label="onnxruntime-genai (its own KV)")
    ax.axhline(1097 if weights == "fp32" else 572, color="red", lw=0.8, label="issue 14 goal at 7680")
    ax.set(title=f"SmolLM2-135M {weights} weights", xlabel="context (tokens)", ylabel="peak RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(here / "kv_dtype_rss.png", dpi=110)
print("wrote", here / "kv_dtype_rss.png")
