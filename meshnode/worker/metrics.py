"""``WorkerMetrics``: a worker's Prometheus metrics, and the page that serves them.

Steps and tokens computed, rows per forward (batch size), time a step waits
for its compute turn (queue wait), time its forward takes on the compute
thread, cache tokens used and free, open sessions, and refusals by error
code. Each worker has its own ``CollectorRegistry`` (never the global one),
so several workers or tests in one process count apart. ``--metrics-port N``
serves ``registry`` in the text format at ``http://host:N/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.web.resource import Resource

#: seconds
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
#: rows of one forward
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class WorkerMetrics:
    """The counters of one worker; ``watch`` ties the gauges to its session table."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps = Counter("meshnode_worker_steps", "forward steps computed", registry=r)
        self.tokens = Counter("meshnode_worker_tokens", "positions computed (prefill and "
                              "decode)", registry=r)
        self.batch_size = Histogram("meshnode_worker_batch_size", "rows of one forward",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("meshnode_worker_queue_wait_seconds",
                                    "a step's wait for its compute turn",
                                    buckets=WAIT_BUCKETS, registry=r)
        self.compute_time = Histogram("meshnode_worker_compute_seconds",
                                      "a forward's time on the compute thread",
                                      buckets=COMPUTE_BUCKETS, registry=r)
        self.errors = Counter("meshnode_worker_errors", "requests refused or failed, by code",
                              ["code"], registry=r)
        self.cache_used = Gauge("meshnode_worker_cache_tokens_used",
                                "cache tokens reserved by open sessions", registry=r)
        self.cache_free = Gauge("meshnode_worker_cache_tokens_free",
                                "cache tokens left in the budget", registry=r)
        self.sessions = Gauge("meshnode_worker_sessions", "open sessions", registry=r)

    def watch(self, table: Any) -> None:
        """Read sessions and cache tokens from ``table`` (a ``SessionTable``) at each scrape."""
        self.sessions.set_function(lambda: len(table))
        self.cache_used.set_function(lambda: table.budget.used)
        self.cache_free.set_function(lambda: table.budget.free)

    def forward_done(self, rows: int, positions: int, seconds: float) -> None:
        """One forward of ``rows`` rows and ``positions`` positions in all, which took
        ``seconds`` on the compute thread (called from that thread: the client is
        thread-safe)."""
        self.steps.inc()
        self.tokens.inc(positions)
        self.batch_size.observe(rows)
        self.compute_time.observe(seconds)

    def failed(self, error: BaseException) -> None:
        self.errors.labels(getattr(error, "code", None) or type(error).__name__).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsPage(Resource):
    """``/metrics`` of a ``WorkerMetrics``, as Prometheus scrapes it."""

    isLeaf = True

    def __init__(self, render: Callable[[], bytes]):
        super().__init__()
        self._render = render

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self._render()


def metrics_site(metrics: WorkerMetrics) -> Any:
    """A ``twisted.web`` site serving ``metrics`` at ``/metrics``."""
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics.render))
    return Site(root)
