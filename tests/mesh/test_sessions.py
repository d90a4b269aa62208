"""The worker's session table and cache budget, driven by a fake clock."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.task import Clock

from meshnode.errors import BadRequest, LengthLimit, NoCapacity, UnknownSession
from meshnode.inference.records import BlockSpan
from meshnode.worker.budget import CacheBudget
from meshnode.worker.sessions import SessionTable

ALICE, BOB = b"a" * 32, b"b" * 32
SPAN = BlockSpan(0, 10)


def make_table(total: int = 1000, idle: float = 60.0) -> tuple[SessionTable, Clock]:
    clock = Clock()
    ids = (i.to_bytes(16, "big") for i in itertools.count(1))
    return SessionTable(CacheBudget(total), clock, idle, new_id=lambda: next(ids)), clock


def test_budget_reserve_and_release():
    """When tokens are reserved past the total, then NoCapacity and nothing is taken."""
    budget = CacheBudget(100)
    budget.reserve(60)
    with pytest.raises(NoCapacity):
        budget.reserve(41)
    assert budget.free == 40
    budget.release(60)
    assert budget.free == 100


def test_a_rounded_up_cache_is_what_the_budget_holds():
    """When the cache of max_length positions is allocated rounded up to a bucket, then the
    budget holds the rounded size, refuses what no longer fits and frees it all on close."""
    clock = Clock()
    table = SessionTable(CacheBudget(96), clock, 60.0, cache_positions=lambda n: 64)
    session = table.open(ALICE, SPAN, 40)
    assert (session.max_length, session.reserved, table.budget.free) == (40, 64, 32)
    with pytest.raises(NoCapacity, match="64 cache tokens asked, 32 of 96 free"):
        table.open(BOB, SPAN, 20)
    table.close(ALICE, session.session_id)
    assert table.budget.free == 96


def test_open_reserves_and_close_frees():
    """When a session opens, then its max length is reserved until it closes."""
    table, _ = make_table(1000)
    session = table.open(ALICE, SPAN, 600)
    assert table.budget.free == 400
    with pytest.raises(NoCapacity):
        table.open(BOB, SPAN, 500)
    table.close(ALICE, session.session_id)
    assert table.budget.free == 1000 and len(table) == 0


def test_other_peer_cannot_see_session():
    """When another peer names a session id, then it is UnknownSession for them."""
    table, _ = make_table()
    session = table.open(ALICE, SPAN, 10)
    with pytest.raises(UnknownSession):
        table.get(BOB, session.session_id)
    with pytest.raises(UnknownSession):
        table.close(BOB, session.session_id)
    assert table.get(ALICE, session.session_id) is session


def test_idle_timeout_frees_cache():
    """When a session stays idle past the timeout, then it is closed and its tokens freed."""
    table, clock = make_table(1000, idle=60)
    idle = table.open(ALICE, SPAN, 100)
    active = table.open(BOB, SPAN, 100)
    clock.advance(50)
    table.get(BOB, active.session_id)
    clock.advance(20)
    assert table.expire_idle() == [idle]
    assert table.budget.free == 900
    with pytest.raises(UnknownSession):
        table.get(ALICE, idle.session_id)
    assert table.get(BOB, active.session_id) is active


def test_busy_session_survives_close_until_step_ends():
    """When a session is closed during a step, then its cache is freed when the step ends."""
    table, clock = make_table(1000, idle=10)
    session = table.open(ALICE, SPAN, 100)
    table.begin_step(session)
    clock.advance(100)
    assert table.expire_idle() == []
    table.close(ALICE, session.session_id)
    assert table.budget.free == 900
    table.end_step(session, cache="new cache", new_position=5)
    assert table.budget.free == 1000 and len(table) == 0


def test_step_checks():
    """When a step disagrees with its session, then it is refused with a named error."""
    table, _ = make_table()
    session = table.open(ALICE, SPAN, 8)
    session.check_step(SPAN, 0, 8)
    with pytest.raises(BadRequest):
        session.check_step(BlockSpan(0, 5), 0, 1)
    with pytest.raises(BadRequest):
        session.check_step(SPAN, 3, 1)
    with pytest.raises(LengthLimit):
        session.check_step(SPAN, 0, 9)
    table.begin_step(session)
    with pytest.raises(BadRequest):
        session.check_step(SPAN, 0, 1)
