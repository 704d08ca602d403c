"""Eval results: scores of the base and each adapter on one data set, the leaderboard, and the results file.

The file (`loraplex eval --out`, read by `promote --results` and the server's /ui) is JSON:
    {"format": "loraplex.eval/1", "base": "smollm2", "data": "tech.jsonl", "metrics": ["loss", ...],
     "scores": {"base": {"loss": 2.1, ...}, "tech": {"loss": 1.4, ...}}, "adapters": {"tech": {"r": 8, ...}},
     "examples": 40, "target_tokens": 1234, "generated": 40, "leaderboard": ["tech", "base"]}
Reading one needs neither torch's training code nor the data pipeline (the server imports this module).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..report import format_table
from ..outputs import PathLike, write_json

METRICS = {"loss": "lower", "perplexity": "lower", "accuracy": "higher", "exact_match": "higher"}  # better is
DEFAULT_METRICS = tuple(METRICS)
BASE = "base"  # the variant name of the bare base in results
RESULTS_FORMAT = "loraplex.eval/1"


@dataclass
class EvalResult:
    """Scores of the base and each adapter on one data set. `scores[variant][metric]`; variant = BASE or a name."""

    base: str
    data: str
    metrics: list[str]
    scores: dict[str, dict[str, float]]
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> path, content_hash, r, ...
    examples: int = 0
    target_tokens: int = 0
    generated: int = 0  # examples scored for exact_match

    def sort_key(self) -> str:
        """The metric the leaderboard sorts by: loss when computed, else the first metric."""
        return "loss" if "loss" in self.metrics else self.metrics[0]

    def leaderboard(self, by: Optional[str] = None) -> list[str]:
        """Variant names, best first by `by` (default sort_key()); NaN scores last."""
        by = by or self.sort_key()
        if by not in self.metrics:
            raise ConfigError(f"cannot rank by {by!r}: these results hold {self.metrics}")
        sign = 1.0 if METRICS[by] == "lower" else -1.0
        return sorted(self.scores, key=lambda v: (math.isnan(self.scores[v][by]), sign * self.scores[v][by]))

    def best(self, by: Optional[str] = None) -> str:
        """The best adapter (never the base) by `by`."""
        ranked = [v for v in self.leaderboard(by) if v in self.adapters]
        if not ranked:
            raise ConfigError("these results hold no adapter, only the base; evaluate some adapters first")
        return ranked[0]

    def table(self) -> str:
        by = self.sort_key()
        rows = []
        for rank, v in enumerate(self.leaderboard(by), 1):
            info = self.adapters.get(v, {})
            rows.append([rank, v,
                         *[_fmt(m, self.scores[v][m]) for m in self.metrics],
                         info.get("r", "-"), str(info.get("content_hash", "-"))[:12]])
        head = ["#", "variant", *[f"{m} ({'v' if METRICS[m] == 'lower' else '^'})" for m in self.metrics], "r", "hash"]
        return format_table(rows, head, align="rl" + "r" * len(self.metrics) + "rl")

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULTS_FORMAT, **asdict(self), "leaderboard": self.leaderboard()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        if data.get("format") != RESULTS_FORMAT:
            raise ConfigError(f"expected eval results of format {RESULTS_FORMAT!r}, got {data.get('format')!r}")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the results JSON atomically (an existing file is replaced only with `overwrite`)."""
        return write_json(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: PathLike) -> "EvalResult":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read eval results {str(path)!r}: {exc}") from None
        return cls.from_dict(data)


def _fmt(metric: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    if METRICS[metric] == "higher":
        return f"{100 * value:.1f}%"
    return f"{value:.4f}" if metric == "loss" else f"{value:.3f}"
