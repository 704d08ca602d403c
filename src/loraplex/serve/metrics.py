"""Serving metrics with prometheus_client, one registry per server, per-adapter labels (`adapter`: an
adapter name, the base's id, or a mix spec as normalised by the engine):

    loraplex_requests_total{adapter, status}              counter: finished requests ("ok", "error", "cancelled")
    loraplex_requests_refused_total{status, code}         counter: requests answered with an error before they ran
    loraplex_prompt_tokens_total{adapter}                 counter: prompt tokens prefilled
    loraplex_generated_tokens_total{adapter}              counter: tokens generated
    loraplex_request_latency_seconds{adapter}             histogram: submit -> finish
    loraplex_time_to_first_token_seconds{adapter}         histogram: submit -> first generated token
    loraplex_inter_token_latency_seconds{adapter}         histogram: between consecutive tokens of a request
    loraplex_adapter_loads_total{adapter}                 counter: adds and replacements through the server
    loraplex_adapter_evictions_total{adapter}             counter: times the adapter left the pool's fast tier
Gauges (`add_gauges`) are read at scrape time from callables (queue length, running, pool bytes...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..extras import require

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The server's counters and histograms (thread-safe: prometheus_client locks); `render()` gives /metrics."""

    def __init__(self) -> None:
        require("serve", "the serving metrics")  # prometheus_client comes with the serve extra
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self._requests = Counter("loraplex_requests", "Finished requests by adapter and status.",
                                 ["adapter", "status"], registry=r)
        self._refused = Counter("loraplex_requests_refused", "Requests answered with an error before they ran, "
                                "by HTTP status and error code.", ["status", "code"], registry=r)
        self._prompt = Counter("loraplex_prompt_tokens", "Prompt tokens prefilled, by adapter.", ["adapter"],
                               registry=r)
        self._generated = Counter("loraplex_generated_tokens", "Tokens generated, by adapter.", ["adapter"],
                                  registry=r)
        self._latency = Histogram("loraplex_request_latency_seconds", "Request latency (submit to finish), by "
                                  "adapter.", ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self._ttft = Histogram("loraplex_time_to_first_token_seconds", "Submit to first generated token, by "
                               "adapter.", ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self._itl = Histogram("loraplex_inter_token_latency_seconds", "Time between consecutive tokens of a "
                              "request, by adapter.", ["adapter"], buckets=TOKEN_BUCKETS, registry=r)
        self._loads = Counter("loraplex_adapter_loads", "Adapter loads and replacements, by name.", ["adapter"],
                              registry=r)
        self._evictions = Counter("loraplex_adapter_evictions", "Evictions from the adapter pool's fast tier, by "
                                  "name.", ["adapter"], registry=r)

    def request_done(self, adapter: str, status: str, prompt_tokens: int, generated: int, seconds: float) -> None:
        self._requests.labels(adapter, status).inc()
        self._prompt.labels(adapter).inc(prompt_tokens)
        self._generated.labels(adapter).inc(generated)
        self._latency.labels(adapter).observe(seconds)

    def token(self, adapter: str, first: bool, seconds: float) -> None:
        """A generated token: `seconds` since submission (the first) or since the previous token."""
        (self._ttft if first else self._itl).labels(adapter).observe(seconds)

    def refused(self, status: int, code: str | None) -> None:
        self._refused.labels(str(status), code or "").inc()

    def adapter_loaded(self, name: str) -> None:
        self._loads.labels(name).inc()

    def adapter_evicted(self, name: str) -> None:
        self._evictions.labels(name).inc()

    def add_gauges(self, gauges: Mapping[str, tuple[str, Callable[[], float]]]) -> None:
        """Gauges read at scrape time: {metric name: (help, read())}."""
        from prometheus_client import Gauge

        for name, (help_, read) in gauges.items():
            Gauge(name, help_, registry=self.registry).set_function(read)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value now (0.0 before it was ever set), e.g. value("loraplex_requests_total",
        adapter="legal", status="ok")."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def labels(self, name: str, label: str) -> dict[str, float]:
        """{value of `label`: sample value} over the samples called `name` (e.g. evictions by adapter)."""
        return {s.labels[label]: s.value for m in self.registry.collect() for s in m.samples if s.name == name}

    def snapshot(self, adapter: str) -> dict[str, float]:
        """One label's counters now: {"requests" (finished, any status), "errors", "generated_tokens",
        "mean_latency_s" (0.0 before any request)}."""
        n = self.value("loraplex_request_latency_seconds_count", adapter=adapter)
        return {"requests": int(sum(self.value("loraplex_requests_total", adapter=adapter, status=s)
                                    for s in ("ok", "error", "cancelled"))),
                "errors": int(self.value("loraplex_requests_total", adapter=adapter, status="error")),
                "generated_tokens": int(self.value("loraplex_generated_tokens_total", adapter=adapter)),
                "mean_latency_s": self.value("loraplex_request_latency_seconds_sum", adapter=adapter) / n if n else 0.0}

    def render(self) -> bytes:
        """The exposition text (Prometheus text format)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
