"""Continuous batching: every waiting step of a worker runs in the next iteration.

A step of ``T`` new positions becomes a ``StepJob``. Whenever the compute
thread is free, ``BatchPlanner.plan`` takes waiting jobs into one
``Iteration`` of at most ``ITERATION_TOKENS`` positions: decode steps (one
position) are *rows*, grouped by the sub-span their session covers, each group
one ``[B, 1, H]`` forward of at most ``MAX_ROWS`` rows; longer steps are cut
into *chunks* of at most ``CHUNK`` positions, one chunk of a job per
iteration, each its own forward. How a prompt is cut depends only on that
step (chunk k covers positions ``[start + k * CHUNK, ...)``), never on what
else waits, and every row and chunk is computed on its own
(meshnode/model/paged.py): a session's outputs do not depend on its
batch-mates.

Steps that arrive in one reactor turn start together: with a ``clock`` (the
worker's reactor), a step that finds the compute thread free does not start an
iteration by itself, it schedules one at the end of the turn
(``callLater(0)``), after every frame the turn read has been handled. Without
it, a burst of 32 steps from one client (a client's head batch, or the 32
pushes after the hop before finished an iteration) would start as 1 row, the
other 31 waiting behind it; at each hop such splits repeat, and under load the
iterations fragment into small ones that cost nearly as much as full ones.

Fairness: jobs wait per client; an iteration admits them round-robin, one job
of each client per round, clients served least recently first, so with ``n``
clients waiting none gets more than about ``1/n`` of an iteration. A client
with ``max_queued`` steps waiting gets ``Overloaded``.

``BatchPlanner`` is pure (no reactor, no model). ``BatchScheduler`` runs its
iterations one at a time through a compute object (``run_iteration(iteration)
-> Deferred[{Work: hidden or Failure}]``, see ``SpanCompute``), fires each step's
Deferred with its own positions only once all its chunks ran, and keeps the
figures routing reads (``last_rows``, ``last_tokens``, ``waiting()``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from meshnode.compute import EndOfTurn
from meshnode.errors import Overloaded, ShapeMismatch, UnknownSession
from meshnode.model.buckets import CHUNK
from meshnode.worker.limits import MAX_QUEUED_PER_PEER

#: decode rows of one sub-span in one forward, at most
MAX_ROWS = 64
#: positions of one iteration, rows and chunks together (one chunk always fits)
ITERATION_TOKENS = 512


@dataclass(eq=False)
class StepJob:
    """One step of one session: ``hidden [1, T, H]`` from position ``start``."""

    owner: bytes
    session: Any  # a worker Session: span, cache (its pages), closed
    hidden: np.ndarray
    start: int
    done: int = 0  # positions already computed
    outputs: list[np.ndarray] = field(default_factory=list)
    result: Deferred | None = None
    #: called when the step's first positions enter an iteration (metrics: its queue wait)
    on_start: Callable[[], None] | None = None

    @property
    def length(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def is_decode(self) -> bool:
        return self.length == 1

    def next_work(self, chunk: int) -> Work:
        return Work(self, self.done, min(chunk, self.length - self.done))


@dataclass(frozen=True, eq=False)
class Work:
    """Positions ``[offset, offset + length)`` of a job's step, in one iteration."""

    job: StepJob
    offset: int
    length: int

    @property
    def start(self) -> int:
        """The absolute position of the first of them."""
        return self.job.start + self.offset

    def hidden(self) -> np.ndarray:
        return self.job.hidden[:, self.offset : self.offset + self.length]  # [1, t, H]


@dataclass
class Iteration:
    """What one pass of the compute thread runs: rows per sub-span, then chunks."""

    rows: dict[Any, list[Work]] = field(default_factory=dict)
    chunks: list[Work] = field(default_factory=list)

    @property
    def works(self) -> list[Work]:
        return [w for group in self.rows.values() for w in group] + self.chunks

    @property
    def row_count(self) -> int:
        return sum(len(group) for group in self.rows.values())

    @property
    def tokens(self) -> int:
        return self.row_count + sum(w.length for w in self.chunks)


class BatchPlanner:
    """Waiting jobs per client, and the choice of each iteration (pure)."""

    def __init__(self, max_rows: int = MAX_ROWS, chunk: int = CHUNK,
                 tokens: int = ITERATION_TOKENS, max_queued: int = MAX_QUEUED_PER_PEER):
        if max_rows < 1 or chunk < 1 or tokens < chunk or max_queued < 1:
            raise ValueError("a planner needs room for a row, a chunk and a queued step")
        self.max_rows, self.chunk, self.tokens = max_rows, chunk, tokens
        self.max_queued = max_queued
        self._waiting: dict[bytes, deque[StepJob]] = {}
        self._last_turn: dict[bytes, int] = {}  # iteration number of each client's last turn
        self._iterations = 0

    def add(self, job: StepJob) -> None:
        """Queue ``job`` behind its client's others; ``Overloaded`` when that client has
        ``max_queued`` waiting already."""
        queue = self._waiting.setdefault(job.owner, deque())
        if len(queue) >= self.max_queued:
            raise Overloaded(f"{len(queue)} requests of yours are already waiting")
        queue.append(job)

    def resume(self, job: StepJob) -> None:
        """Put back a job whose step has chunks left: first of its client's (never refused)."""
        self._waiting.setdefault(job.owner, deque()).appendleft(job)

    def remove(self, job: StepJob) -> bool:
        """Drop a waiting job (cancelled); False when it is not waiting."""
        queue = self._waiting.get(job.owner)
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        if not queue:
            del self._waiting[job.owner]
        return True

    def waiting(self, owner: bytes | None = None) -> int:
        """Steps waiting (of ``owner``, or of everyone), not counting those running."""
        if owner is not None:
            return len(self._waiting.get(owner, ()))
        return sum(len(queue) for queue in self._waiting.values())

    def plan(self) -> Iteration | None:
        """The next iteration, its jobs taken off the queues; None when nothing waits."""
        if not self._waiting:
            return None
        self._iterations += 1
        iteration, rows, budget, taken = Iteration(), 0, self.tokens, 0
        owners = sorted(self._waiting, key=lambda o: self._last_turn.get(o, -1))
        while owners:
            still = []
            for owner in owners:
                work = self._take(owner, rows, budget, first=not taken)
                if work is None:
                    continue
                taken += 1
                self._last_turn[owner] = self._iterations
                still.append(owner)
                if work.job.is_decode:
                    iteration.rows.setdefault(work.job.session.span, []).append(work)
                    rows += 1
                else:
                    iteration.chunks.append(work)
                budget -= work.length
            owners = still
        return iteration

    def _take(self, owner: bytes, rows: int, budget: int, first: bool) -> Work | None:
        """``owner``'s first waiting job that fits what is left of the iteration."""
        queue = self._waiting.get(owner)
        for job in list(queue or ()):
            work = job.next_work(self.chunk)
            fits = work.length <= budget or first
            if job.is_decode and rows >= self.max_rows:
                fits = False
            if fits:
                queue.remove(job)
                if not queue:
                    del self._waiting[owner]
                return work
        return None


class BatchScheduler:
    """Runs the planner's iterations one at a time on a compute object."""

    def __init__(self, compute: Any, planner: BatchPlanner | None = None,
                 on_cache_lost: Callable[[], None] = lambda: None, clock: Any = None):
        # ``compute.run_iteration(iteration) -> Deferred[{Work: [1, t, H]}]``; its
        # ``cache_resets`` count goes up when a failed call took the shared cache with it
        self.compute = compute
        self.planner = planner or BatchPlanner()
        self._on_cache_lost = on_cache_lost
        self._resets = getattr(compute, "cache_resets", 0)
        self._running: Iteration | None = None
        # ``clock.callLater``: a free compute thread starts at the end of the reactor turn,
        # with every step that turn brought (None: at once, with the first)
        self._pump_soon = EndOfTurn(clock, self._pump).soon
        self.iterations = 0
        #: rows and positions of the last iteration run (what routing calls the current batch)
        self.last_rows = 0
        self.last_tokens = 0

    def submit(self, owner: bytes, session: Any, hidden: np.ndarray, start: int,
               on_start: Callable[[], None] | None = None) -> Deferred:
        """Run ``hidden [1, T, H]`` of ``session`` from ``start``; fires with ``[1, T, H]``.
        ``on_start()`` is called when its first positions enter an iteration."""
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
            return fail(ShapeMismatch(f"a step is [1, T, H], got shape {hidden.shape}"))
        job = StepJob(owner, session, hidden, start, on_start=on_start)
        job.result = Deferred(lambda _: self.planner.remove(job))
        try:
            self.planner.add(job)
        except Overloaded as exc:
            return fail(exc)
        if self._running is None:  # a running iteration starts the next itself when it ends
            self._pump_soon()
        return job.result

    def waiting(self, owner: bytes | None = None) -> int:
        return self.planner.waiting(owner)

    def batch_load(self) -> int:
        """Steps waiting plus the rows of the iteration running now (``BatchReport``)."""
        return self.waiting() + (self.last_rows if self.busy else 0)

    def batch_throughput(self) -> list[tuple[int, float]]:
        """The compute's decode rates at batch sizes, measured at start (``BatchReport``)."""
        return sorted(getattr(self.compute, "batch_throughput", {}).items())

    @property
    def busy(self) -> bool:
        return self._running is not None

    def _pump(self) -> None:
        if self._running is not None:
            return
        iteration = self.planner.plan()
        if iteration is None:
            return
        self._running = iteration
        self.iterations += 1
        self.last_rows, self.last_tokens = iteration.row_count, iteration.tokens
        for work in iteration.works:
            if work.offset == 0 and work.job.on_start is not None:
                work.job.on_start()
        done = self.compute.run_iteration(iteration)
        done.addBoth(self._finished, iteration)

    def _finished(self, outcome: Any, iteration: Iteration) -> None:
        self._running = None
        if isinstance(outcome, Failure):
            for work in iteration.works:
                self._fire(work.job, outcome)
        else:
            for work in iteration.works:
                self._advance(work, outcome[work])
        resets = getattr(self.compute, "cache_resets", 0)
        if resets != self._resets:
            self._resets = resets
            self._on_cache_lost()
        self._pump()

    def _advance(self, work: Work, hidden: Any) -> None:
        job = work.job
        if isinstance(hidden, Failure):  # its own forward failed, the others' stand
            self._fire(job, hidden)
            return
        job.outputs.append(hidden)
        job.done += work.length
        if job.done == job.length:
            out = job.outputs[0] if len(job.outputs) == 1 else np.concatenate(job.outputs, 1)
            self._fire(job, out)
        elif job.session.closed or (job.result is not None and job.result.called):
            self._fire(job, Failure(UnknownSession("session closed during its step")))
        else:
            self.planner.resume(job)

    @staticmethod
    def _fire(job: StepJob, outcome: Any) -> None:
        if job.result is None or job.result.called:  # cancelled: drop the outcome
            return
        if isinstance(outcome, Failure):
            job.result.errback(outcome)
        else:
            job.result.callback(outcome)
