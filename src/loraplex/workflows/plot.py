"""Eval results as a chart: one panel per metric, one bar per variant (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..extras import require
from ..outputs import write_png
from .results import BASE, METRICS, EvalResult


def plot_results(result: EvalResult, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A PNG bar chart of `result` (matplotlib Agg), written atomically (an existing file is replaced only with
    `overwrite`): one panel per metric, one bar per variant in leaderboard order, the base in grey; returns the path.
    Raises MissingDependencyError without matplotlib (the 'plot' extra)."""
    require("plot", "plotting eval results")
    import matplotlib

    matplotlib.use("Agg", force=False)  # keep a caller's backend if pyplot is already set up
    from matplotlib.figure import Figure

    order = result.leaderboard()
    n = len(result.metrics)
    fig = Figure(figsize=(max(4.0, 0.6 * len(order) + 1.5) * n, 3.8), dpi=100)  # bare Figure: no pyplot state
    axes = fig.subplots(1, n, squeeze=False)[0]
    colors = ["0.6" if v == BASE else f"C{i % 10}" for i, v in enumerate(order)]
    for ax, metric in zip(axes, result.metrics):
        values = [result.scores[v][metric] for v in order]
        shown = [0.0 if math.isnan(x) else x for x in values]
        bars = ax.bar(range(len(order)), shown, color=colors)
        for bar, x in zip(bars, values):
            label = "n/a" if math.isnan(x) else f"{100 * x:.0f}%" if METRICS[metric] == "higher" else f"{x:.4g}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize="small", xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{metric} ({'lower' if METRICS[metric] == 'lower' else 'higher'} is better)", fontsize="medium")
        if METRICS[metric] == "higher":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"loraplex eval: {result.base} on {result.data} ({result.examples} examples)", fontsize="medium")
    fig.tight_layout()
    return write_png(fig, path, overwrite=overwrite)
