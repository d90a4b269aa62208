"""The worker's fair queue: round-robin across clients, bounded, cancellable."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred

from meshnode.errors import Overloaded
from meshnode.worker.fairness import FairQueue


class ManualCompute:
    """Work items that finish only when the test says so, in the order they started."""

    def __init__(self):
        self.started: list[str] = []
        self.running: list[Deferred] = []

    def job(self, name: str):
        def work() -> Deferred:
            self.started.append(name)
            d = Deferred()
            self.running.append(d)
            return d

        return work

    def finish_next(self) -> None:
        self.running.pop(0).callback("done")


def test_a_flooding_client_does_not_starve_others():
    """When client A queues 10 requests and then B and C queue 2 each, then once A's first
    is done the turns go B, C, A, B, C, A, ... not all of A first."""
    queue, compute = FairQueue(max_in_flight=1), ManualCompute()
    results = [queue.submit(b"A", compute.job(f"A{i}")) for i in range(10)]
    results += [queue.submit(b"B", compute.job(f"B{i}")) for i in range(2)]
    results += [queue.submit(b"C", compute.job(f"C{i}")) for i in range(2)]
    while compute.running:
        compute.finish_next()
    assert compute.started[:7] == ["A0", "B0", "C0", "A1", "B1", "C1", "A2"]
    assert compute.started[7:] == [f"A{i}" for i in range(3, 10)]
    assert all(r.called for r in results)


def test_at_most_max_in_flight_run_at_once():
    """When many requests wait, then no more than ``max_in_flight`` run together."""
    queue, compute = FairQueue(max_in_flight=2), ManualCompute()
    for i in range(5):
        queue.submit(b"A", compute.job(f"A{i}"))
    assert len(compute.running) == 2 and queue.in_flight == 2 and queue.waiting() == 3
    compute.finish_next()
    assert len(compute.running) == 2 and queue.waiting() == 2


def test_a_client_over_its_queue_limit_is_told_it_is_overloaded():
    """When a client already has ``max_queued`` requests waiting, then the next one fails
    with Overloaded and another client is still accepted."""
    queue, compute = FairQueue(max_in_flight=1, max_queued=3), ManualCompute()
    for i in range(4):  # one runs, three wait
        queue.submit(b"A", compute.job(f"A{i}"))
    refused = queue.submit(b"A", compute.job("A4"))
    errors = []
    refused.addErrback(lambda f: errors.append(f.value))
    assert isinstance(errors[0], Overloaded)
    accepted = queue.submit(b"B", compute.job("B0"))
    assert not accepted.called and queue.waiting(b"B") == 1


def test_cancelled_waiting_requests_never_run():
    """When a waiting request is cancelled (its connection dropped), then it is not run and
    fails with CancelledError; one cancelled while running finishes unseen."""
    queue, compute = FairQueue(max_in_flight=1), ManualCompute()
    running = queue.submit(b"A", compute.job("A0"))
    waiting = queue.submit(b"A", compute.job("A1"))
    seen = []
    waiting.addErrback(lambda f: seen.append(f.check(CancelledError)))
    running.addErrback(lambda f: seen.append(f.check(CancelledError)))
    waiting.cancel()
    running.cancel()
    compute.finish_next()
    assert compute.started == ["A0"] and queue.in_flight == 0 and queue.waiting() == 0
    assert seen == [CancelledError, CancelledError]


def test_synchronous_work_and_failures_pass_through():
    """When work returns a plain value or raises, then the caller gets that value or error,
    and a long run of synchronous work does not recurse."""
    queue = FairQueue()
    values = []
    for i in range(2000):
        queue.submit(bytes([i % 7]), lambda i=i: i).addCallback(values.append)
    assert values == list(range(2000))
    errors = []
    queue.submit(b"A", lambda: 1 / 0).addErrback(lambda f: errors.append(f.type))
    assert errors == [ZeroDivisionError] and queue.in_flight == 0
