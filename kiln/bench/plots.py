"""Accuracy against latency and against model bytes, with the Pareto front marked.

A point is on the front when no other point is at least as cheap *and* at least as accurate, and strictly better
in one of the two: those are the only variants worth choosing for some budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kiln.bench.runner import BenchResult
from kiln.errors import KilnError

_COLORS = {"fp32": "black", "ort": "tab:blue", "kiln": "tab:orange"}
_LABELS = {"fp32": "fp32", "ort": "ONNX Runtime quantizers", "kiln": "kiln recipes"}
#: Variants whose metric is more than this much worse than fp32 (relative) are drawn on the panel's edge.
OFF_SCALE_LOSS = 0.5


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
    """Indices of the points (cost, quality) no other point dominates, by increasing cost.

    Lower cost is better; quality is better when higher if ``higher_is_better``, else when lower. Of identical
    points only the first is kept.
    """

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = False
        for j, (other_cost, other_quality) in enumerate(points):
            if j == i:
                continue
            no_worse = other_cost <= cost and better_or_equal(other_quality, quality)
            strictly = other_cost < cost or other_quality != quality
            if no_worse and (strictly or j < i):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _visible_range(result: BenchResult) -> tuple[float, float]:
    """The metric range drawn: every point at most :data:`OFF_SCALE_LOSS` worse than fp32, plus a margin."""
    kept = [row.metric.candidate for row in result.rows if row.metric.relative_loss <= OFF_SCALE_LOSS]
    low, high = min(kept), max(kept)
    margin = (high - low) * 0.08 or abs(high) * 0.01 or 0.01
    return low - margin, high + margin


def plot_tradeoffs(result: BenchResult, path: str | Path) -> Path:
    """Write a PNG: metric vs median latency and vs bytes (log x), Pareto fronts marked.

    Points are numbered, with the names listed beside the panels (names written at the points overlap). Variants
    more than 50% worse than fp32 are drawn as triangles on the edge of the panel, so they do not squash the rest.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise KilnError("plots need matplotlib: pip install 'onnx-kiln[bench]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    path = Path(path)
    low, high = _visible_range(result)
    quality = [row.metric.candidate for row in result.rows]
    shown = [min(max(q, low), high) for q in quality]
    edge = "v" if result.higher_is_better else "^"
    panels = [
        ("median latency, batch 1 (ms, log scale)", [row.latency.median_ms for row in result.rows]),
        ("model size (MB, log scale)", [row.bytes / 1e6 for row in result.rows]),
    ]
    direction = "higher is better" if result.higher_is_better else "lower is better"
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6))
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, (xlabel, cost) in zip(axes, panels):
        front = pareto_front(list(zip(cost, quality)), higher_is_better=result.higher_is_better)
        ax.step([cost[i] for i in front], [shown[i] for i in front], "--", where="post", color="tab:green", zorder=1)
        for i, row in enumerate(result.rows):
            off = shown[i] != quality[i]
            ax.scatter(
                cost[i],
                shown[i],
                s=90 if i in front else 40,
                color=_COLORS[row.kind],
                edgecolors="tab:green" if i in front else "none",
                linewidths=2,
                marker="*" if row.kind == "fp32" else edge if off else "o",
                zorder=2,
            )
            ax.annotate(str(i + 1), (cost[i], shown[i]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="both", labelsize=8)
        ax.set_ylim(low, high)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{result.metric} ({direction})")
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], marker="*" if kind == "fp32" else "o", linestyle="", color=color, label=_LABELS[kind])
        for kind, color in _COLORS.items()
    ]
    handles.append(Line2D([], [], marker=edge, linestyle="", color="gray", label="off scale (> 50% worse)"))
    handles.append(Line2D([], [], linestyle="--", color="tab:green", label="Pareto front (ringed points)"))
    axes[0].legend(handles=handles, fontsize=8, loc="best")
    names = [
        f"{i + 1:>2}  {row.name}" + (f"  ({_value(q)})" if shown[i] != q else "")
        for i, (row, q) in enumerate(zip(result.rows, quality))
    ]
    fig.text(0.805, 0.88, "\n".join(names), fontsize=8, family="monospace", va="top")
    fig.suptitle(f"{result.model}: {result.metric} vs latency and size")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value(value: float) -> str:
    return f"{value:.4g}"
