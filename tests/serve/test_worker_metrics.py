"""A worker's metrics as a specification: they move with steps, sessions and refusals.

The handlers run over a fake compute (as in ``tests/mesh/test_handlers.py``) with
a ``WorkerMetrics``; the text format is read back with prometheus_client's parser.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock

from meshnode.errors import UnknownSession
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.message import PeerInfo
from meshnode.worker.budget import CacheBudget
from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
from meshnode.worker.metrics import WorkerMetrics
from meshnode.worker.sessions import SessionTable

H = 8
SPAN = BlockSpan(0, 4)
ALICE = PeerInfo(b"a" * 32, "127.0.0.1", 1)


class FakeCompute:
    """Echoes its input; reports each forward to the metrics as SpanCompute does."""

    hidden_size = H

    def __init__(self, metrics):
        self.metrics = metrics

    def new_cache(self, span, max_length):
        return succeed([])

    def forward(self, span, hidden, start, cache):
        self.metrics.forward_done(hidden.shape[0], hidden.shape[0] * hidden.shape[1], 0.001)
        return succeed((hidden, cache))


def samples(metrics: WorkerMetrics) -> dict[tuple, float]:
    """Every sample of the text format, by (name, sorted labels)."""
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def result_of(d):
    out = []
    maybeDeferred(lambda: d).addBoth(out.append)
    (value,) = out
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


@pytest.fixture()
def worker():
    metrics = WorkerMetrics()
    ids = (i.to_bytes(16, "big") for i in itertools.count(1))
    table = SessionTable(CacheBudget(100), Clock(), 60, new_id=lambda: next(ids))
    handlers = InferenceHandlers(WorkerLimits("fp", SPAN, 64, "float32"), table,
                                 FakeCompute(metrics), metrics=metrics).handlers()
    metrics.watch(table)
    return handlers, metrics


def test_two_workers_count_apart():
    """When two workers live in one process, then each has its own registry."""
    a, b = WorkerMetrics(), WorkerMetrics()
    a.steps.inc()
    assert samples(a)[("meshnode_worker_steps_total", ())] == 1
    assert samples(b)[("meshnode_worker_steps_total", ())] == 0


def test_steps_tokens_sessions_and_cache_move(worker):
    """When a session opens and steps a prompt then a token, then steps, tokens, batch
    sizes, queue waits, sessions and cache tokens say so; when it closes, they go back."""
    handlers, metrics = worker
    reply = result_of(handlers[messages.OPEN](ALICE, messages.build_open("fp", SPAN, 30)))
    session = reply.fields["session"]
    assert samples(metrics)[("meshnode_worker_sessions", ())] == 1
    assert samples(metrics)[("meshnode_worker_cache_tokens_used", ())] > 0
    for start, length in ((0, 5), (5, 1)):
        hidden = np.ones((1, length, H), dtype=np.float32)  # [1, T, H]
        result_of(handlers[messages.STEP](ALICE, messages.build_step(session, SPAN, start,
                                                                      hidden)))
    now = samples(metrics)
    assert now[("meshnode_worker_steps_total", ())] == 2
    assert now[("meshnode_worker_tokens_total", ())] == 6
    assert now[("meshnode_worker_batch_size_count", ())] == 2
    assert now[("meshnode_worker_compute_seconds_count", ())] == 2
    assert now[("meshnode_worker_queue_wait_seconds_count", ())] == 3  # open and two steps
    result_of(handlers[messages.CLOSE](ALICE, messages.build_close(session)))
    after = samples(metrics)
    assert after[("meshnode_worker_sessions", ())] == 0
    assert after[("meshnode_worker_cache_tokens_used", ())] == 0
    assert after[("meshnode_worker_cache_tokens_free", ())] == 100


def test_refusals_are_counted_by_code(worker):
    """When a step names an unknown session, then it is refused and counted under its code."""
    handlers, metrics = worker
    hidden = np.ones((1, 1, H), dtype=np.float32)  # [1, 1, H]
    with pytest.raises(UnknownSession):
        result_of(handlers[messages.STEP](ALICE, messages.build_step(b"x" * 16, SPAN, 0,
                                                                      hidden)))
    assert samples(metrics)[("meshnode_worker_errors_total",
                             (("code", "unknown_session"),))] == 1
