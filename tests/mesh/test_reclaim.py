"""Capacity that throwaway identities cannot hold: reclaim of idle sessions, and opens that
wait for room (``SessionTable`` with ``reclaim_idle``, ``OpenAdmission``), on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from meshnode.errors import NoCapacity, Overloaded, RetryLater, UnknownSession
from meshnode.inference.records import BlockSpan
from meshnode.worker.admission import OpenAdmission
from meshnode.worker.budget import CacheBudget
from meshnode.worker.sessions import SessionTable

SPAN = BlockSpan(0, 6)
RECLAIM = 5.0


def table(total: int = 300, reclaim_idle: float | None = RECLAIM) -> tuple[SessionTable, Clock]:
    clock = Clock()
    return SessionTable(CacheBudget(total), clock, reclaim_idle=reclaim_idle), clock


def owner(n: int) -> bytes:
    return bytes([n]) * 32


def test_under_pressure_the_least_recently_stepped_idle_sessions_go_first():
    """When the budget is full and the holders have been idle past reclaim_idle, then an open
    frees the least recently stepped ones, only as many as it needs, and their owners are
    told the session was reclaimed."""
    sessions, clock = table()
    held = []
    for n in range(3):
        held.append(sessions.open(owner(n), SPAN, 100))
        clock.advance(1.0)
    sessions.begin_step(held[0])
    sessions.end_step(held[0], None, 1)  # 0 stepped last: it is the most recently stepped
    clock.advance(RECLAIM)
    fresh = sessions.open(owner(9), SPAN, 100)
    assert fresh.reserved == 100 and sessions.reclaims == 1
    assert sessions.get(owner(0), held[0].session_id) is held[0]
    assert sessions.get(owner(2), held[2].session_id) is held[2]
    with pytest.raises(UnknownSession, match="reclaimed under cache pressure"):
        sessions.get(owner(1), held[1].session_id)


def test_busy_and_recent_sessions_are_never_reclaimed():
    """When the holders are busy with a step or stepped within reclaim_idle, then nothing is
    reclaimed and the open is refused with RetryLater saying when room is expected."""
    sessions, clock = table(total=200)
    busy = sessions.open(owner(1), SPAN, 100)
    sessions.begin_step(busy)
    recent = sessions.open(owner(2), SPAN, 100)
    clock.advance(RECLAIM + 10)
    sessions.begin_step(recent)
    sessions.end_step(recent, None, 1)
    clock.advance(2.0)
    with pytest.raises(RetryLater) as refused:
        sessions.open(owner(3), SPAN, 100)
    assert refused.value.code == "no_capacity"
    assert refused.value.retry_after == pytest.approx(RECLAIM - 2.0)
    assert sessions.reclaims == 0 and len(sessions) == 2


def test_without_reclaim_a_full_budget_refuses_at_once_as_before():
    """When reclaim is off, then a full budget raises plain NoCapacity whatever the idleness."""
    sessions, clock = table(total=100, reclaim_idle=None)
    sessions.open(owner(1), SPAN, 100)
    clock.advance(1000.0)
    with pytest.raises(NoCapacity) as refused:
        sessions.open(owner(2), SPAN, 100)
    assert not isinstance(refused.value, RetryLater)


def test_an_open_waits_for_throwaway_holders_to_become_reclaimable():
    """When six throwaway identities hold every token and never step, then a real user's open
    waits instead of failing, and is served exactly when the oldest holder has been idle for
    reclaim_idle, well inside the wait."""
    sessions, clock = table(total=600)
    for n in range(6):
        sessions.open(owner(n), SPAN, 100)
        clock.advance(0.5)
    admission = OpenAdmission(sessions, clock, max_wait=RECLAIM + 1)
    got = []
    admission.open(owner(42), SPAN, 100).addBoth(got.append)
    assert got == [] and admission.waiting == 1
    clock.advance(RECLAIM - 3.0 - 0.01)
    assert got == []
    clock.advance(0.01)
    assert got and got[0].owner == owner(42)
    assert sessions.reclaims == 1 and admission.waiting == 0


def test_a_close_wakes_a_waiting_open_at_once():
    """When a holder closes its session while an open waits, then the open is served on the
    next reactor turn, without waiting for its timer."""
    sessions, clock = table(total=100)
    first = sessions.open(owner(1), SPAN, 100)
    admission = OpenAdmission(sessions, clock, max_wait=RECLAIM + 1)
    got = []
    admission.open(owner(2), SPAN, 100).addBoth(got.append)
    sessions.close(owner(1), first.session_id)
    clock.advance(0)
    assert got and got[0].owner == owner(2)


def test_when_no_room_comes_the_open_fails_with_retry_after():
    """When the holders keep stepping for the whole wait, then the open fails after max_wait
    with no_capacity and a retry_after, and waiting opens are served in order."""
    sessions, clock = table(total=100)
    holder = sessions.open(owner(1), SPAN, 100)
    admission = OpenAdmission(sessions, clock, max_wait=3.0)
    outcomes = []
    admission.open(owner(2), SPAN, 100).addBoth(outcomes.append)
    admission.open(owner(3), SPAN, 50).addBoth(outcomes.append)
    for _ in range(6):
        clock.advance(0.5)
        sessions.begin_step(holder)
        sessions.end_step(holder, None, holder.position + 1)
    clock.advance(RECLAIM)
    assert [type(o.value) for o in outcomes] == [RetryLater, RetryLater]
    assert outcomes[0].value.retry_after > 0
    assert "retry after" in str(outcomes[0].value)


def test_too_many_waiting_opens_are_overloaded():
    """When max_waiting opens already wait, then the next one fails at once with Overloaded
    saying when to retry."""
    sessions, clock = table(total=100)
    sessions.open(owner(1), SPAN, 100)
    admission = OpenAdmission(sessions, clock, max_wait=3.0, max_waiting=2)
    for n in range(2):
        admission.open(owner(10 + n), SPAN, 100).addErrback(lambda _: None)
    refused = []
    admission.open(owner(20), SPAN, 100).addErrback(refused.append)
    assert refused and refused[0].check(Overloaded) and "retry after" in str(refused[0].value)
    clock.advance(10.0)


def test_an_open_larger_than_the_whole_budget_is_refused_at_once():
    """When a session could never fit, then no wait: NoCapacity now."""
    sessions, clock = table(total=100)
    admission = OpenAdmission(sessions, clock)
    refused = []
    admission.open(owner(1), SPAN, 200).addErrback(refused.append)
    assert refused and refused[0].check(NoCapacity) and not refused[0].check(RetryLater)


def test_retry_after_travels_in_the_error_frame():
    """When a handler refuses with RetryLater, then the error frame carries code no_capacity
    and retry_after, and the asking side's RemoteError has it."""

    from meshnode.wire.protocol import _remote_error
    from tests.wire.wire_helpers import MemoryConnection, raw_frame, request_header

    def refuse(peer, message):
        raise RetryLater("64 cache tokens asked, 0 of 64 free", 2.5)

    connection = MemoryConnection({"infer.open": refuse})
    connection.feed(raw_frame(request_header("infer.open")))
    (header,) = connection.sent_headers()
    assert header["kind"] == "error" and header["fields"]["code"] == "no_capacity"
    assert header["fields"]["retry_after"] == 2.5
    assert _remote_error(header["fields"]).retry_after == 2.5
