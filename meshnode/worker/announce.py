"""``Announcer``: a worker's signed DHT records, one per block it serves, kept fresh.

Each refresh stores, for every block of the span, the worker's current
``ServerInfo`` (free cache tokens change as sessions come and go) with an
expiry ``ttl`` seconds ahead; refreshes come every ``interval`` seconds, well
inside the ttl, so a live worker never drops out while a dead one fades
within ``ttl``. A clean stop stores the records once more as ``offline``.
Time comes from the injected clock.

``batching_fields`` reads what routing needs to weigh a loaded worker against
an idle one (``ServerInfo.batch_load``, ``batch_throughput``) from the
worker's compute, through two optional methods (``BatchReport``); a compute
without them announces neither, and routing uses ``throughput`` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from meshnode.inference.records import MAX_BATCH_POINTS, BlockSpan, ServerInfo, WorkerState

#: seconds a block record lives without refresh
DEFAULT_TTL = 60.0
#: seconds between refreshes
DEFAULT_INTERVAL = 20.0
#: the least amount by which a new announcement's expiry passes the previous one's
EXPIRY_STEP = 0.001


class BatchReport(Protocol):
    """What a batching worker's compute tells routing; both methods are optional."""

    def batch_load(self) -> int:
        """Steps to run now: those waiting plus those of the last batch."""

    def batch_throughput(self) -> Sequence[tuple[int, float]]:
        """``(batch size, tokens/s through the span)`` points, batch sizes increasing."""


def batching_fields(compute: Any) -> dict[str, Any]:
    """``ServerInfo`` keyword arguments from ``compute``'s ``BatchReport`` methods, where it
    has them (at most ``MAX_BATCH_POINTS`` points, spread over the curve)."""
    fields: dict[str, Any] = {}
    load = getattr(compute, "batch_load", None)
    if callable(load):
        fields["batch_load"] = int(load())
    curve = getattr(compute, "batch_throughput", None)
    if callable(curve):
        points = sorted((int(b), float(t)) for b, t in curve() if t > 0)
        if len(points) > MAX_BATCH_POINTS:
            step = (len(points) - 1) / (MAX_BATCH_POINTS - 1)
            points = [points[round(i * step)] for i in range(MAX_BATCH_POINTS)]
        fields["batch_throughput"] = tuple(points)
    return fields


class Announcer:
    """Stores ``info(state).to_record()`` under ``key_for(block)`` for each block of ``span``."""

    log = Logger()

    def __init__(
        self,
        dht: Any,
        clock: Any,
        span: BlockSpan,
        key_for: Callable[[int], bytes],
        info: Callable[[WorkerState], ServerInfo],
        ttl: float = DEFAULT_TTL,
        interval: float = DEFAULT_INTERVAL,
    ):
        self._dht = dht
        self._clock = clock
        self._span = span
        self._key_for = key_for
        self._info = info
        self.ttl = ttl
        self._loop = LoopingCall(self._refresh)
        self._loop.clock = clock
        self._interval = interval
        self._pending: Deferred | None = None
        self._last_expiration = 0.0

    def announce(self, state: WorkerState) -> Deferred[list]:
        """Store the record of every block; fires with the per-block results."""
        value = self._info(state).to_record()
        # strictly later than the previous announcement, or the DHT keeps the previous one
        expiration = max(self._clock.seconds() + self.ttl, self._last_expiration + EXPIRY_STEP)
        self._last_expiration = expiration
        stores = [
            self._dht.store(self._key_for(block), value, expiration)
            for block in self._span.blocks()
        ]
        return DeferredList(stores, consumeErrors=True)

    def start(self) -> Deferred:
        """Announce now and every ``interval`` seconds; fires after the first announcement."""
        first = self.announce(WorkerState.ONLINE)
        self._loop.start(self._interval, now=False).addErrback(
            lambda failure: self.log.failure("announcement loop stopped", failure)
        )
        return first

    def stop(self) -> Deferred:
        """Stop refreshing and announce ``offline`` (fires when stored, or failed)."""
        if self._loop.running:
            self._loop.stop()
        if self._pending is not None:
            self._pending.cancel()
        # The DHT keeps, per writer, the record that expires last: the offline record
        # must expire after the last online one to replace it, hence the full ttl.
        return self.announce(WorkerState.OFFLINE)

    def refresh_now(self) -> None:
        """Announce the current info now, unless an announcement is in flight (what the
        periodic refresh does, early: when something routing reads has changed)."""
        if self._loop.running:
            self._refresh()

    def _refresh(self) -> None:
        if self._pending is not None:
            return  # the previous refresh is still in flight: skip, do not pile up
        pending = self.announce(WorkerState.ONLINE)
        self._pending = pending

        def done(results: list) -> None:
            self._pending = None
            failed = [r for ok, r in results if not ok]
            if failed:
                self.log.emit(
                    LogLevel.warn,
                    "{n} block records not stored: {why}",
                    n=len(failed),
                    why=failed[0].getErrorMessage(),
                )

        pending.addCallback(done)
        pending.addErrback(lambda failure: setattr(self, "_pending", None))
