"""Serving metrics in the Prometheus text exposition format (version 0.0.4), with per-adapter labels.

Counters (label `adapter`: an adapter name, the base's id, or a mix spec as requested):
    loraplex_requests_total{adapter, status}       finished requests by status ("ok", "error", "cancelled")
    loraplex_prompt_tokens_total{adapter}          prompt tokens prefilled
    loraplex_generated_tokens_total{adapter}       tokens generated
    loraplex_request_latency_seconds{adapter}      histogram: submit -> finish
    loraplex_adapter_loads_total{adapter}          adds and replacements through the server
    loraplex_adapter_evictions_total{adapter}      times the adapter left the pool's fast tier (memory budget)
Gauges are read at scrape time from callables given to `render` (queue length, running, pool bytes...).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Thread-safe counters; `render()` gives the /metrics page."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (adapter, status) -> count
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generated_tokens: dict[str, int] = defaultdict(int)
        self.loads: dict[str, int] = defaultdict(int)
        self.evictions: dict[str, int] = defaultdict(int)
        self._lat_buckets: dict[str, list[int]] = {}  # adapter -> count per bucket (not cumulative)
        self._lat_sum: dict[str, float] = defaultdict(float)
        self._lat_count: dict[str, int] = defaultdict(int)

    def request_done(self, adapter: str, status: str, prompt_tokens: int, generated: int, seconds: float) -> None:
        with self._lock:
            self.requests[(adapter, status)] += 1
            self.prompt_tokens[adapter] += prompt_tokens
            self.generated_tokens[adapter] += generated
            b = self._lat_buckets.setdefault(adapter, [0] * len(LATENCY_BUCKETS))
            for i, le in enumerate(LATENCY_BUCKETS):
                if seconds <= le:
                    b[i] += 1
                    break
            self._lat_sum[adapter] += seconds
            self._lat_count[adapter] += 1

    def adapter_loaded(self, name: str) -> None:
        with self._lock:
            self.loads[name] += 1

    def adapter_evicted(self, name: str) -> None:
        with self._lock:
            self.evictions[name] += 1

    def snapshot(self, adapter: str) -> dict[str, float]:
        """One label's counters now: {"requests" (finished, any status), "errors", "generated_tokens",
        "mean_latency_s" (0.0 before any request)}."""
        with self._lock:
            n = self._lat_count.get(adapter, 0)
            return {"requests": sum(v for (a, _), v in self.requests.items() if a == adapter),
                    "errors": self.requests.get((adapter, "error"), 0),
                    "generated_tokens": self.generated_tokens.get(adapter, 0),
                    "mean_latency_s": self._lat_sum.get(adapter, 0.0) / n if n else 0.0}

    def render(self, gauges: Mapping[str, tuple[str, Callable[[], float]]] = {}) -> str:
        """The exposition text; `gauges` = {metric name: (help, read())}."""
        out: list[str] = []
        with self._lock:
            _family(out, "loraplex_requests_total", "counter", "Finished requests by adapter and status.",
                    [({"adapter": a, "status": s}, v) for (a, s), v in sorted(self.requests.items())])
            _family(out, "loraplex_prompt_tokens_total", "counter", "Prompt tokens prefilled, by adapter.",
                    [({"adapter": a}, v) for a, v in sorted(self.prompt_tokens.items())])
            _family(out, "loraplex_generated_tokens_total", "counter", "Tokens generated, by adapter.",
                    [({"adapter": a}, v) for a, v in sorted(self.generated_tokens.items())])
            out.append("# HELP loraplex_request_latency_seconds Request latency (submit to finish), by adapter.")
            out.append("# TYPE loraplex_request_latency_seconds histogram")
            for a in sorted(self._lat_buckets):
                cum = 0
                for le, n in zip(LATENCY_BUCKETS, self._lat_buckets[a]):
                    cum += n
                    out.append(f"loraplex_request_latency_seconds_bucket{_labels({'adapter': a, 'le': repr(le)})} {cum}")
                out.append(f"loraplex_request_latency_seconds_bucket{_labels({'adapter': a, 'le': '+Inf'})} "
                           f"{self._lat_count[a]}")
                out.append(f"loraplex_request_latency_seconds_sum{_labels({'adapter': a})} {self._lat_sum[a]:.6f}")
                out.append(f"loraplex_request_latency_seconds_count{_labels({'adapter': a})} {self._lat_count[a]}")
            _family(out, "loraplex_adapter_loads_total", "counter", "Adapter loads and replacements, by name.",
                    [({"adapter": a}, v) for a, v in sorted(self.loads.items())])
            _family(out, "loraplex_adapter_evictions_total", "counter",
                    "Evictions from the adapter pool's fast tier, by name.",
                    [({"adapter": a}, v) for a, v in sorted(self.evictions.items())])
        for name, (help_, read) in gauges.items():
            _family(out, name, "gauge", help_, [({}, read())])
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{_labels(labels)} {_num(value)}")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
