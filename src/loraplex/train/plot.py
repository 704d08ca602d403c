"""Loss curves from metrics.jsonl rows, drawn with matplotlib's Agg backend (no display needed).

Rows are the dicts `train` appends to DIR/metrics.jsonl, e.g.
    {"step": 0, "adapter": "default", "eval_loss": 3.1}
    {"step": 1, "adapter": "default", "loss": 3.0, "lr": 2e-4, "tokens_per_s": 812.5, ...}
One solid line (train loss) and one dashed line with dots (eval loss) per adapter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..extras import require
from ..outputs import write_png


def plot_losses(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "",
                overwrite: bool = False) -> Path:
    """Write the train/eval loss curves of `rows` to `path` (PNG) atomically (an existing file is replaced
    only with `overwrite`); returns the path.
    Raises MissingDependencyError without matplotlib (the 'plot' extra)."""
    require("plot", "drawing loss curves")
    import matplotlib

    matplotlib.use("Agg", force=False)  # keep a caller's backend if pyplot is already set up
    from matplotlib.figure import Figure

    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for row in rows:
        per = curves.setdefault(str(row.get("adapter", "default")), {"loss": ([], []), "eval_loss": ([], [])})
        for key in ("loss", "eval_loss"):
            if row.get(key) is not None:
                per[key][0].append(int(row["step"]))
                per[key][1].append(float(row[key]))
    fig = Figure(figsize=(7, 4), dpi=100)  # a bare Figure: no pyplot global state, safe in threads
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    for i, (name, per) in enumerate(sorted(curves.items())):
        label = "" if len(curves) == 1 else f"{name}: "
        color = colors[i % len(colors)]
        steps, values = per["loss"]
        if steps:
            ax.plot(steps, values, color=color, linewidth=1.2, label=f"{label}train")
        steps, values = per["eval_loss"]
        if steps:
            ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=3, label=f"{label}eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.set_title(title or "loraplex train")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return write_png(fig, path, overwrite=overwrite)
