"""``FairQueue``: a worker's compute requests, served round-robin across clients.

All model work of a worker runs on one compute thread, one call at a time.
Handed to it in arrival order, a client that sends many requests at once
would make everybody else wait behind all of them. Instead each request
waits in its client's queue, and whenever the compute thread is free the
next request is taken from the client served least recently (one that just
arrived first): with ``n`` clients waiting, each gets every ``n``-th turn
whatever it sent.

At most ``max_in_flight`` requests are handed to the compute thread at once
(1: strict turns; 2 keeps the thread busy while the reactor answers the last
one). A client with ``max_queued`` requests waiting gets ``Overloaded``.
Cancelling a waiting request (its connection dropped) removes it unrun; a
request already running finishes and its result is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from meshnode.errors import Overloaded
from meshnode.worker.limits import MAX_QUEUED_PER_PEER

T = TypeVar("T")


@dataclass
class _Job:
    owner: bytes
    work: Callable[[], Any]
    result: Deferred


class FairQueue:
    """Round-robin over owners of ``work`` callables returning Deferreds (or values)."""

    def __init__(self, max_in_flight: int = 1, max_queued: int = MAX_QUEUED_PER_PEER):
        if max_in_flight < 1 or max_queued < 1:
            raise ValueError("a fair queue needs room for at least one request")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._waiting: dict[bytes, deque[_Job]] = {}
        # turn number of each owner's last turn, kept while it has work waiting or
        # running; the next turn goes to the owner served least recently (new: first)
        self._last_turn: dict[bytes, int] = {}
        self._running: dict[bytes, int] = {}
        self._turns = 0
        self._in_flight = 0
        self._pumping = False

    def submit(self, owner: bytes, work: Callable[[], Deferred[T] | T]) -> Deferred[T]:
        """Run ``work()`` when ``owner``'s turn comes; fires with its result."""
        waiting = self._waiting.get(owner)
        if waiting is not None and len(waiting) >= self.max_queued:
            return fail(Overloaded(f"{len(waiting)} requests of yours are already waiting"))
        job = _Job(owner, work, Deferred(lambda d: self._cancel(job)))
        self._waiting.setdefault(owner, deque()).append(job)
        self._pump()
        return job.result

    def waiting(self, owner: bytes | None = None) -> int:
        """Requests waiting (of ``owner``, or of everyone), not counting those running."""
        if owner is not None:
            return len(self._waiting.get(owner, ()))
        return sum(len(jobs) for jobs in self._waiting.values())

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _pump(self) -> None:
        if self._pumping:
            return  # a synchronous job finished inside the loop below: the loop goes on
        self._pumping = True
        try:
            while self._in_flight < self.max_in_flight and self._waiting:
                owner = min(self._waiting, key=lambda o: self._last_turn.get(o, -1))
                jobs = self._waiting[owner]
                job = jobs.popleft()
                if not jobs:
                    del self._waiting[owner]
                self._turns += 1
                self._last_turn[owner] = self._turns
                self._run(job)
        finally:
            self._pumping = False

    def _run(self, job: _Job) -> None:
        self._in_flight += 1
        self._running[job.owner] = self._running.get(job.owner, 0) + 1

        def done(outcome: Any) -> None:
            self._in_flight -= 1
            self._running[job.owner] -= 1
            if not self._running[job.owner]:
                del self._running[job.owner]
                self._forget_if_idle(job.owner)
            self._pump()
            if job.result.called:  # cancelled while running: drop the outcome
                return
            if isinstance(outcome, Failure):
                job.result.errback(outcome)
            else:
                job.result.callback(outcome)

        maybeDeferred(job.work).addBoth(done)

    def _cancel(self, job: _Job) -> None:
        jobs = self._waiting.get(job.owner)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._waiting[job.owner]
                self._forget_if_idle(job.owner)

    def _forget_if_idle(self, owner: bytes) -> None:
        if owner not in self._waiting and owner not in self._running:
            self._last_turn.pop(owner, None)
