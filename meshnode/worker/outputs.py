"""``OutputMailbox``: forwarded steps' outputs, matched with their owner's ``infer.wait``.

With forwarding, a later hop's step arrives from the hop before (``infer.push``)
while its output is asked for by the session's owner (``infer.wait``): either
may come first. Each (session, start) has one slot:

- ``reserve`` when a push is accepted (its output is coming);
- ``deliver`` the reply (``infer.wait.ok``) or the failure when the step (and
  the push onward) is over: it goes to the waiting owner at once, or is held;
- ``wait`` fires with what was delivered, at once or when it comes. A wait for
  a position the session has passed with nothing held fails at once
  (``WaitExpired``); a second wait for the same slot replaces the first.

Everything is bounded: a delivered outcome is held ``hold_time`` seconds, a
wait waits ``wait_time`` seconds (then ``WaitExpired``), a session has at most
``per_session`` slots and the mailbox ``capacity`` (the oldest go first).
Pure apart from the injected clock (``seconds()``, ``callLater``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from meshnode.errors import WaitExpired

#: seconds a delivered output waits for its owner's ``infer.wait``
HOLD_TIME = 60.0
#: seconds an ``infer.wait`` waits for its step to be pushed and run
WAIT_TIME = 120.0
#: slots one session may have at once (one step runs at a time; retries add one)
PER_SESSION = 4
#: slots of all sessions together
CAPACITY = 4096

_Key = tuple[bytes, int]


@dataclass
class _Slot:
    outcome: Any = None              # the reply Message, or a Failure; None: not yet
    delivered: bool = False
    waiter: Deferred | None = None
    timer: Any = None


class OutputMailbox:
    """Outputs of pushed steps by (session id, start), for their owners' waits."""

    def __init__(self, clock: Any, hold_time: float = HOLD_TIME, wait_time: float = WAIT_TIME,
                 per_session: int = PER_SESSION, capacity: int = CAPACITY):
        self._clock = clock
        self.hold_time, self.wait_time = hold_time, wait_time
        self.per_session, self.capacity = per_session, capacity
        self._slots: OrderedDict[_Key, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def reserve(self, session_id: bytes, start: int) -> None:
        """A push for ``start`` was accepted: its outcome is coming."""
        self._slot(session_id, start)

    def deliver(self, session_id: bytes, start: int, outcome: Any) -> None:
        """The step at ``start`` is over: ``outcome`` (reply ``Message`` or ``Failure``)."""
        key = (session_id, start)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slot(session_id, start)
        if slot.waiter is not None:
            self._pop(key)
            self._fire(slot.waiter, outcome)
            return
        slot.outcome, slot.delivered = outcome, True
        self._arm(key, slot, self.hold_time)

    def wait(self, session_id: bytes, start: int, position: int) -> Deferred:
        """The outcome of the step at ``start``; ``position``: where the session is now."""
        key = (session_id, start)
        slot = self._slots.get(key)
        if slot is None and start < position:
            return _expired(f"no output held for position {start} (the session is at "
                            f"{position})")
        if slot is None:
            slot = self._slot(session_id, start)
        if slot.delivered:
            self._pop(key)
            done: Deferred = Deferred()
            self._fire(done, slot.outcome)
            return done
        if slot.waiter is not None:
            self._fire(slot.waiter, Failure(WaitExpired("replaced by a newer wait")))
        slot.waiter = Deferred(lambda _: self._cancelled(key))
        self._arm(key, slot, self.wait_time)
        return slot.waiter

    def close(self) -> None:
        """Fail every wait, drop every held output, cancel every timer."""
        for key in list(self._slots):
            slot = self._pop(key)
            if slot.waiter is not None:
                self._fire(slot.waiter, Failure(WaitExpired("the worker is stopping")))

    # -- internals ---------------------------------------------------------

    def _slot(self, session_id: bytes, start: int) -> _Slot:
        key = (session_id, start)
        if key in self._slots:
            return self._slots[key]
        mine = [k for k in self._slots if k[0] == session_id]
        for old in mine[: max(0, len(mine) - self.per_session + 1)]:
            self._evict(old)
        while len(self._slots) >= self.capacity:
            self._evict(next(iter(self._slots)))
        slot = self._slots[key] = _Slot()
        self._arm(key, slot, self.wait_time)
        return slot

    def _arm(self, key: _Key, slot: _Slot, seconds: float) -> None:
        if slot.timer is not None and slot.timer.active():
            slot.timer.cancel()
        slot.timer = self._clock.callLater(seconds, self._evict, key)

    def _evict(self, key: _Key) -> None:
        slot = self._slots.get(key)
        if slot is None:
            return
        self._pop(key)
        if slot.waiter is not None:
            self._fire(slot.waiter, Failure(WaitExpired(
                f"no output for position {key[1]} within {self.wait_time:g} s")))

    def _cancelled(self, key: _Key) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.waiter = None  # the outcome, when it comes, is held for a newer wait

    def _pop(self, key: _Key) -> _Slot:
        slot = self._slots.pop(key)
        if slot.timer is not None and slot.timer.active():
            slot.timer.cancel()
        return slot

    @staticmethod
    def _fire(waiter: Deferred, outcome: Any) -> None:
        if waiter.called:
            return
        if isinstance(outcome, Failure):
            waiter.errback(outcome)
        else:
            waiter.callback(outcome)


def _expired(message: str) -> Deferred:
    done: Deferred = Deferred()
    done.errback(Failure(WaitExpired(message)))
    return done
