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


def test_worker_handlers_take_compute_turns_per_client():
    """When client A has steps on five sessions waiting and client B sends one step, then the
    worker computes B's step right after A's first, not after all of A's."""
    import itertools

    import numpy as np
    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock

    from meshnode.inference import messages
    from meshnode.inference.records import BlockSpan
    from meshnode.wire.message import PeerInfo
    from meshnode.worker.budget import CacheBudget
    from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
    from meshnode.worker.sessions import SessionTable

    span, order, pending = BlockSpan(0, 2), [], []

    class Compute:
        hidden_size = 4

        def new_cache(self, span, max_length):
            return succeed(None)

        def forward(self, span, hidden, start, cache):
            order.append(int(hidden[0, 0, 0]))
            pending.append(Deferred())
            return pending[-1].addCallback(lambda _: (hidden, cache))

    ids = (i.to_bytes(16, "big") for i in itertools.count(1))
    table = SessionTable(CacheBudget(1000), Clock(), 60, lambda: next(ids))
    handlers = InferenceHandlers(
        WorkerLimits("fp", span, 64, "float32"), table, Compute(), queue=FairQueue()
    )
    alice, bob = PeerInfo(b"a" * 32, "h", 1), PeerInfo(b"b" * 32, "h", 2)

    def open_session(peer: PeerInfo) -> bytes:
        opened = []
        handlers.open(peer, messages.build_open("fp", span, 8)).addCallback(opened.append)
        return messages.parse_session_id(opened[0].fields)

    def step(peer: PeerInfo, session: bytes, tag: int) -> None:
        hidden = np.full((1, 1, 4), tag, np.float32)
        handlers.step(peer, messages.build_step(session, span, 0, hidden))

    alice_sessions = [open_session(alice) for _ in range(5)]
    bob_session = open_session(bob)
    for tag, session in enumerate(alice_sessions):
        step(alice, session, tag)
    step(bob, bob_session, 100)
    while pending:
        pending.pop(0).callback(None)
    assert order == [0, 100, 1, 2, 3, 4]
