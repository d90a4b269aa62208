"""``ComputeThread``: one dedicated thread for the JAX work of a process.

A process that runs the model beside a reactor (a worker over its span, a
client over its head) hands every JAX call to one thread, so the reactor
thread never waits on the model and calls run one after another, in the order
they were made. ``call`` returns a Deferred that fires on the reactor thread;
cancelling it does not stop the call in flight, it only drops its result.

``EndOfTurn`` is how both feed it batches: work that arrives in one reactor
turn is handed over together, at the end of that turn. ``row_bucket`` is
the batch size both pad a batch of rows to: each bucket is one compiled
program, so a process compiles a handful of programs, not one per batch size
(a new program costs 0.1-0.2 s on the client's head, seconds on a span).

Neutral ground: ``meshnode.client`` and ``meshnode.worker`` both use it, and
neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

#: a batch of rows is padded up to the next of these (one program each)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def row_bucket(rows: int) -> int:
    """The smallest row bucket that holds ``rows`` (``rows`` itself past the last)."""
    return next((bucket for bucket in ROW_BUCKETS if rows <= bucket), rows)


class ComputeThread:
    """One dedicated thread for every JAX call of a process (and slow file reads)."""

    def __init__(self, reactor: Any, name: str = "meshnode-compute"):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)

    @property
    def started(self) -> bool:
        return bool(self._pool.started)

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        """Join the thread (after the call in flight, if any)."""
        if self._pool.started:
            self._pool.stop()

    def call(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(*args)`` on the compute thread."""
        return deferToThreadPool(self._reactor, self._pool, function, *args)


class EndOfTurn:
    """Runs ``function`` once at the end of the reactor turn, however often asked in it.

    With a ``clock`` (a reactor), ``soon()`` schedules ``function`` with
    ``callLater(0)``, which runs after every event the turn read was handled;
    without one (tests), ``soon()`` runs it at once."""

    def __init__(self, clock: Any, function: Callable[[], None]):
        self._clock = clock
        self._function = function
        self._call: Any = None

    def soon(self) -> None:
        if self._clock is None:
            self._function()
        elif self._call is None:
            self._call = self._clock.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        self._function()
