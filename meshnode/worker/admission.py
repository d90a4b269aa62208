"""``OpenAdmission``: a session open that does not fit waits briefly for room, in order.

``SessionTable.open`` reclaims idle sessions under pressure, or raises
``RetryLater`` saying when enough room should be reclaimable. Here, instead
of failing at once, the open waits: it is retried when that time comes or
when any session frees its cache, whichever is first, for at most
``max_wait`` seconds; then the client gets ``no_capacity`` with
``retry_after``. Waiting opens are served first come, first served (a new
open does not overtake one already waiting), and at most ``max_waiting``
wait at once: past that, ``Overloaded`` with ``retry_after``.

With ``max_wait`` at least the table's ``reclaim_idle``, sessions that are
held but never stepped cannot refuse anyone: their room is reclaimable within
``reclaim_idle`` of their last step, inside the wait.

Time and timers come from the injected clock (``seconds``, ``callLater``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from meshnode.errors import NoCapacity, Overloaded, RetryLater
from meshnode.inference.records import BlockSpan
from meshnode.worker.sessions import Session, SessionTable

#: seconds an open may wait for room (worker default; above DEFAULT_RECLAIM_IDLE on purpose)
DEFAULT_OPEN_WAIT = 6.0
#: opens waiting for room at once, all clients together
MAX_WAITING_OPENS = 64


@dataclass
class _Waiter:
    owner: bytes
    span: BlockSpan
    max_length: int
    deadline: float
    result: Deferred[Session] = field(default_factory=Deferred)


class OpenAdmission:
    """Opens sessions in ``table``, waiting up to ``max_wait`` for room; see the module doc."""

    def __init__(
        self,
        table: SessionTable,
        clock: Any,
        max_wait: float = DEFAULT_OPEN_WAIT,
        max_waiting: int = MAX_WAITING_OPENS,
    ) -> None:
        self.table = table
        self.clock = clock
        self.max_wait = max_wait
        self.max_waiting = max_waiting
        self._waiting: deque[_Waiter] = deque()
        self._timer: Any = None
        table.on_free(self._wake)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def open(self, owner: bytes, span: BlockSpan, max_length: int) -> Deferred[Session]:
        """A session, now or once room is made; fails as ``SessionTable.open`` would, after
        at most ``max_wait`` seconds for ``NoCapacity``."""
        if not self._waiting:
            try:
                return succeed(self.table.open(owner, span, max_length))
            except RetryLater as exc:
                if self.max_wait <= 0:
                    return fail(exc)
            except Exception as exc:  # noqa: BLE001 - every refusal goes back to the caller
                return fail(exc)
        if len(self._waiting) >= self.max_waiting:
            return fail(Overloaded(f"{len(self._waiting)} opens already wait for cache room; "
                                   f"retry after {self.max_wait:.1f} s"))
        waiter = _Waiter(owner, span, max_length, self.clock.seconds() + self.max_wait)
        waiter.result = Deferred(lambda _: self._forget(waiter))
        self._waiting.append(waiter)
        self._serve()
        return waiter.result

    def cancel_all(self) -> None:
        """Fail every waiting open (the worker is stopping)."""
        waiting, self._waiting = list(self._waiting), deque()
        self._cancel_timer()
        for waiter in waiting:
            waiter.result.errback(Failure(NoCapacity("the worker is stopping")))

    def _wake(self) -> None:
        if self._waiting:
            self.clock.callLater(0, self._serve)

    def _serve(self) -> None:
        self._cancel_timer()
        next_try: float | None = None
        while self._waiting:
            waiter = self._waiting[0]
            try:
                session = self.table.open(waiter.owner, waiter.span, waiter.max_length)
            except RetryLater as exc:
                now = self.clock.seconds()
                if now >= waiter.deadline:
                    self._waiting.popleft()
                    waiter.result.errback(Failure(exc))
                    continue
                next_try = min(now + exc.retry_after, waiter.deadline)
                break
            except Exception:  # noqa: BLE001 - every refusal goes back to the caller
                self._waiting.popleft()
                waiter.result.errback(Failure())
                continue
            self._waiting.popleft()
            waiter.result.callback(session)
        if next_try is not None:
            delay = max(0.0, next_try - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._serve)

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
