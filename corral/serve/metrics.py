"""The server's Prometheus metrics (`GET /metrics`), named like vLLM's where vLLM has the metric.

Each app has its own registry (several servers in one process, as in tests, never share counters).
Request metrics are observed by the handlers as a reply's events arrive; the engine gauges (running,
waiting, batch) are read from each engine when Prometheus scrapes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from corral.generate.types import Engine

PREFIX = "corral:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)


class _EngineGauges:
    """Scrape-time gauges: each engine's running and waiting sequences and its latest decode batch."""

    def __init__(self, engines: list[Engine]):
        self.engines = engines

    def collect(self):
        stats = [engine.stats() for engine in self.engines]
        for name, doc, value in (
            ("num_requests_running", "Sequences in the running batch.", sum(s.running for s in stats)),
            ("num_requests_waiting", "Sequences waiting for a place in the batch.", sum(s.waiting for s in stats)),
            ("batch_size", "Rows in the latest decode step, summed over engines.", sum(s.batch for s in stats)),
        ):
            family = GaugeMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family


class Metrics:
    def __init__(self, engines: list[Engine]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter(PREFIX + "http_requests", "HTTP requests by method, route and status.",
                            ["method", "path", "status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished replies by finish reason.", ["finished_reason"],
                               registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From admission to a reply's first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between a reply's consecutive tokens.",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From admission to a request's last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineGauges(engines))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestClock:
    """One request's timings and counts, fed with its events as they arrive."""

    def __init__(self, metrics: Metrics | None, prompt_tokens: int):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: dict[int, float] = {}  # reply index -> time of its latest token
        if metrics:
            metrics.prompt_tokens.inc(prompt_tokens)

    def token(self, index: int) -> None:
        if not self.metrics:
            return
        now = time.perf_counter()
        if index in self.last:
            self.metrics.itl.observe(now - self.last[index])
        elif not self.last:
            self.metrics.ttft.observe(now - self.start)
        self.last[index] = now
        self.metrics.generation_tokens.inc()

    def finished(self, reason: str) -> None:
        if self.metrics:
            self.metrics.success.labels(reason).inc()

    def done(self) -> None:
        if self.metrics:
            self.metrics.e2e.observe(time.perf_counter() - self.start)
