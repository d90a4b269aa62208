"""The worker's bounds on sessions: per peer, lifetime, and on a dropped connection."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from meshnode.errors import NoCapacity, SessionLimit, UnknownSession
from meshnode.inference.records import BlockSpan
from meshnode.worker.budget import CacheBudget
from meshnode.worker.sessions import SessionTable

SPAN = BlockSpan(0, 4)


def make_table(clock: Clock, tokens: int = 1000, **limits) -> SessionTable:
    return SessionTable(CacheBudget(tokens), clock, idle_timeout=60, **limits)


def test_a_peer_over_its_session_limit_is_refused_and_others_are_not():
    """When a peer holds ``max_per_owner`` sessions, then its next open is SessionLimit,
    another peer still opens one, and closing one lets the first open again."""
    table = make_table(Clock(), max_per_owner=3)
    sessions = [table.open(b"A", SPAN, 10) for _ in range(3)]
    with pytest.raises(SessionLimit):
        table.open(b"A", SPAN, 10)
    table.open(b"B", SPAN, 10)
    table.close(b"A", sessions[0].session_id)
    table.open(b"A", SPAN, 10)
    assert table.owned_by(b"A") == 3 and table.budget.used == 40


def test_sessions_older_than_max_age_are_freed_even_when_used():
    """When a session is stepped often but is older than ``max_age``, then the sweep frees
    it (a busy one when its step ends) and its tokens return to the budget."""
    clock = Clock()
    table = make_table(clock, max_age=100)
    busy, used = table.open(b"A", SPAN, 10), table.open(b"A", SPAN, 10)
    for _ in range(5):
        clock.advance(25)
        table.get(b"A", used.session_id)
        table.get(b"A", busy.session_id)
    table.begin_step(busy)
    assert {s.session_id for s in table.expire_idle()} == {busy.session_id, used.session_id}
    assert table.budget.used == 10  # the busy one holds its cache until its step ends
    table.end_step(busy, None, 1)
    assert table.budget.used == 0 and len(table) == 0
    with pytest.raises(UnknownSession):
        table.get(b"A", used.session_id)


def test_a_dropped_connection_frees_the_peers_sessions():
    """When a peer's connection drops, then all its sessions are freed, nobody else's."""
    table = make_table(Clock(), tokens=30)
    for _ in range(2):
        table.open(b"A", SPAN, 10)
    kept = table.open(b"B", SPAN, 10)
    with pytest.raises(NoCapacity):
        table.open(b"B", SPAN, 10)
    table.close_owned(b"A")
    assert table.owned_by(b"A") == 0 and table.budget.used == 10
    assert table.get(b"B", kept.session_id) is kept
    table.open(b"B", SPAN, 20)
