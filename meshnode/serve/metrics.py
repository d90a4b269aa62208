"""``ServerMetrics``: the Prometheus metrics of ``meshnode serve``, in their own registry.

Requests by endpoint and status, prompt and completion tokens, time to first
token, time between tokens, and the streams open now. ``/metrics`` renders
``registry`` in the text format (``prometheus_client.generate_latest``). A
registry per server, not the global one, so servers in one process (tests)
count apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: seconds: from request in to first token out
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds between two tokens of one stream
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Counters and histograms of one server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("meshnode_api_requests", "HTTP API requests by endpoint and "
                                "status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("meshnode_api_prompt_tokens",
                                     "prompt tokens taken in", registry=r)
        self.completion_tokens = Counter("meshnode_api_completion_tokens",
                                         "completion tokens sent out", registry=r)
        self.time_to_first_token = Histogram(
            "meshnode_api_time_to_first_token_seconds", "request in to first token out",
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_token = Histogram(
            "meshnode_api_time_per_output_token_seconds", "time between two tokens of a request",
            buckets=TPOT_BUCKETS, registry=r)
        self.open_streams = Gauge("meshnode_api_open_streams", "streamed responses open now",
                                  registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
