"""The mailbox of pushed steps' outputs: a wait and its output meet in either order, bounded."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from meshnode.errors import UnknownSession, WaitExpired
from meshnode.worker.outputs import OutputMailbox

S1, S2 = b"1" * 16, b"2" * 16


class Watched:
    """What a Deferred fired with, once it has (None before)."""

    def __init__(self, d):
        self.got = []
        d.addBoth(self.got.append)

    @property
    def value(self):
        return self.got[0] if self.got else None


def outcome(d):
    return Watched(d).value


def test_a_wait_before_the_push_gets_the_output_when_it_comes():
    """When the owner waits before the push arrives, then its wait fires on delivery."""
    box = OutputMailbox(Clock())
    waiting = Watched(box.wait(S1, 4, position=4))
    assert waiting.value is None
    box.reserve(S1, 4)
    box.deliver(S1, 4, "output at 4")
    assert waiting.value == "output at 4"
    assert len(box) == 0


def test_an_output_before_the_wait_is_held_for_it():
    """When the step ran before the owner's wait came, then the wait gets it at once."""
    box = OutputMailbox(Clock())
    box.reserve(S1, 0)
    box.deliver(S1, 0, "output at 0")
    assert outcome(box.wait(S1, 0, position=5)) == "output at 0"
    assert len(box) == 0


def test_a_failure_reaches_the_wait():
    """When the pushed step failed, then the owner's wait fails with that error."""
    box = OutputMailbox(Clock())
    waiting = Watched(box.wait(S1, 0, position=0))
    box.deliver(S1, 0, Failure(UnknownSession("gone")))
    assert waiting.value.check(UnknownSession)


def test_a_wait_for_a_passed_position_with_nothing_held_fails_at_once():
    """When the session is past ``start`` and no output is held, then WaitExpired at once."""
    box = OutputMailbox(Clock())
    assert outcome(box.wait(S1, 3, position=8)).check(WaitExpired)


def test_a_reserved_step_is_waited_for_even_once_the_position_moved():
    """When the push is accepted (reserved) and the session has moved past it while its
    push on is in flight, then a wait still waits for the output."""
    box = OutputMailbox(Clock())
    box.reserve(S1, 3)
    waiting = Watched(box.wait(S1, 3, position=4))
    assert waiting.value is None
    box.deliver(S1, 3, "late")
    assert waiting.value == "late"


def test_waits_and_held_outputs_are_bounded_in_time():
    """When nothing comes for ``wait_time``, then the wait fails; an output nobody asks for
    is dropped after ``hold_time``."""
    clock = Clock()
    box = OutputMailbox(clock, hold_time=5, wait_time=10)
    waiting = Watched(box.wait(S1, 0, position=0))
    clock.advance(10)
    assert waiting.value.check(WaitExpired)
    box.reserve(S2, 0)
    box.deliver(S2, 0, "unclaimed")
    clock.advance(5)
    assert len(box) == 0
    assert outcome(box.wait(S2, 0, position=1)).check(WaitExpired)


def test_a_newer_wait_replaces_the_older():
    """When the owner waits twice for one step (a retry), then the first wait fails and
    the second gets the output."""
    box = OutputMailbox(Clock())
    first = Watched(box.wait(S1, 0, position=0))
    second = Watched(box.wait(S1, 0, position=0))
    assert first.value.check(WaitExpired)
    box.deliver(S1, 0, "out")
    assert second.value == "out"


def test_a_cancelled_wait_leaves_the_output_for_the_next():
    """When the owner gives up a wait (cancelled), then the output is held for a new one."""
    box = OutputMailbox(Clock())
    first = box.wait(S1, 0, position=0)
    first.addErrback(lambda _: None)
    first.cancel()
    box.deliver(S1, 0, "out")
    assert outcome(box.wait(S1, 0, position=1)) == "out"


@pytest.mark.parametrize("per_session, capacity", [(2, 100), (100, 3)])
def test_slots_are_bounded_per_session_and_in_all(per_session, capacity):
    """When more slots are made than a session (or the mailbox) may hold, then the oldest
    are dropped, and their waits fail."""
    box = OutputMailbox(Clock(), per_session=per_session, capacity=capacity)
    waits = [Watched(box.wait(S1, start, position=0)) for start in range(5)]
    assert len(box) == min(per_session, capacity)
    assert all(w.value.check(WaitExpired) for w in waits[: 5 - len(box)])
    assert all(w.value is None for w in waits[5 - len(box):])


def test_close_fails_every_wait():
    """When the worker stops, then every waiting owner is told."""
    box = OutputMailbox(Clock())
    waiting = Watched(box.wait(S1, 0, position=0))
    box.close()
    assert waiting.value.check(WaitExpired) and len(box) == 0
