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
    return _save(fig, path, title)


def budget_plot(path: str | Path, rows: list[dict], title: str) -> Path:
    """`kvtrt eval` rows as one subplot per task: each policy's metric against its budget (a line), the
    full cache as a horizontal line, and a peer's per-budget values (`peer_value`: kvpress's presses, OpenVINO
    GenAI's evictions) as separate hollow markers in the policy's colour, with the peer's own full cache dotted.
    Rows without a budget (a spec that fixes its own) are drawn as single points at their token count
    fraction when it is a fraction, else left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        full = task_rows[0]["full_value"]
        ax.axhline(full, color="black", lw=1.2, label=f"full cache ({full:.2f})")
        peer_full = next((r["peer_full_value"] for r in task_rows if "peer_full_value" in r), None)
        engine = next((r["peer"].split(" ")[0] for r in task_rows if "peer_full_value" in r), "peer")
        if peer_full is not None:
            ax.axhline(peer_full, color="grey", lw=1, ls=":", label=f"{engine} full cache ({peer_full:.2f})")
        lines: dict[str, list[tuple[float, float, float | None]]] = defaultdict(list)
        for r in task_rows:
            if r["policy"] == "full" or not isinstance(r.get("budget"), float):
                continue
            lines[r["policy"]].append((r["budget"], r["value"], r.get("peer_value")))
        for i, (policy, points) in enumerate(lines.items()):
            points.sort()
            colour = colours[i % len(colours)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=f"kvtrt {policy}")
            peer = [(p[0], p[2]) for p in points if p[2] is not None]
            if peer:
                press = next((r["peer"].split(" ", 2)[-1].split("(")[0] for r in task_rows
                              if r["policy"] == policy and r.get("peer_value") is not None), "peer")
                ax.scatter([p[0] for p in peer], [p[1] for p in peer], marker="D", s=46, facecolors="none",
                           edgecolors=colour, linewidths=1.5, zorder=3, label=f"{engine} {press}")
        ax.set_xlabel("budget (fraction of the context kept)")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path: str | Path, title: str) -> Path:
    """Title, lay out, write the PNG and close the figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
