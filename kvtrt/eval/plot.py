"""PNG plots next to the tables of `kvtrt bench` and `kvtrt eval` (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def line_plot(path: str | Path, panels: list[tuple[str, str]], rows: list[dict], x: str, series: str,
              title: str) -> Path:
    """One subplot per (metric key, y label); one line per distinct `series` value; x along `x`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        lines = defaultdict(list)
        for row in rows:
            if row.get(key) is not None:
                lines[row[series]].append((row[x], row[key]))
        for name, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(name))
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
