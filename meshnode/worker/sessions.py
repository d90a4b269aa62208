"""``SessionTable``: the inference sessions a worker holds, and their idle timeouts.

A session belongs to the peer that opened it (its TLS-verified node id): another
peer naming the same id gets ``UnknownSession``, so ids never leak between
clients. A session holds its cache tokens from ``open`` until ``close`` or an
idle timeout. A session busy with a step is never freed under it: a close or
timeout during a step marks it closed and the step's end frees it.

Reclaim under pressure (issue 14): with ``reclaim_idle`` set, an open that does
not fit the budget first frees sessions that are not busy and have not
stepped (nor opened) for ``reclaim_idle`` seconds, least recently stepped
first, and only as many as it needs. When that is not enough it raises
``RetryLater`` (a ``NoCapacity``) whose ``retry_after`` says when enough room
is expected to become reclaimable (``meshnode.worker.admission`` waits that
long before giving up). The owner of a reclaimed session is told so at its
next step (``UnknownSession`` "reclaimed"), and replays elsewhere or here.

Pure: time comes from an injected clock (anything with ``seconds()``), ids from
an injected factory; the cache object itself is opaque here, except that one
with a ``release()`` method (pages of a worker's shared cache) is released
when its session is freed, never while a step runs on it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshnode.errors import (
    BadRequest,
    LengthLimit,
    NoCapacity,
    RetryLater,
    SessionLimit,
    UnknownSession,
)
from meshnode.inference.records import SESSION_ID_BYTES, BlockSpan
from meshnode.worker.budget import CacheBudget
from meshnode.worker.limits import MAX_SESSION_AGE, MAX_SESSIONS_PER_PEER

#: a session untouched for this long is closed and its cache freed
DEFAULT_IDLE_TIMEOUT = 300.0
#: under cache pressure, a session not stepped for this long may be reclaimed (worker default)
DEFAULT_RECLAIM_IDLE = 5.0
#: ids of reclaimed sessions remembered, to tell their owners why a step finds nothing
REMEMBERED_RECLAIMS = 4096


class Clock(Protocol):
    def seconds(self) -> float: ...


@dataclass
class Session:
    """One client's KV cache over one span, and where the next step must start."""

    session_id: bytes
    owner: bytes
    span: BlockSpan
    max_length: int
    last_used: float
    position: int = 0
    cache: Any = None
    busy: bool = False
    closed: bool = False
    steps: int = field(default=0)
    opened: float = 0.0
    #: cache tokens held in the budget: max_length rounded up as the cache is allocated
    reserved: int = 0

    def check_step(self, span: BlockSpan, start: int, length: int) -> None:
        """Raise unless a step of ``length`` new positions at ``start`` fits this session."""
        if span != self.span:
            raise BadRequest(f"step for span {span} on a session over {self.span}")
        if self.busy:
            raise BadRequest("a step is already in flight on this session")
        if start != self.position:
            raise BadRequest(f"step starts at {start}, session is at position {self.position}")
        if length <= 0:
            raise BadRequest("a step needs at least one position")
        if start + length > self.max_length:
            raise LengthLimit(
                f"step to position {start + length} exceeds the session's "
                f"max length {self.max_length}"
            )


class SessionTable:
    """Open sessions by id, inside a ``CacheBudget``."""

    def __init__(
        self,
        budget: CacheBudget,
        clock: Clock,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        new_id: Callable[[], bytes] = lambda: os.urandom(SESSION_ID_BYTES),
        max_per_owner: int = MAX_SESSIONS_PER_PEER,
        max_age: float = MAX_SESSION_AGE,
        cache_positions: Callable[[int], int] = lambda max_length: max_length,
        reclaim_idle: float | None = None,
    ):
        self.budget = budget
        # None: never reclaim (a full budget refuses at once, as before issue 14)
        self.reclaim_idle = reclaim_idle
        self._reclaimed: OrderedDict[bytes, float] = OrderedDict()
        self._free_listeners: list[Callable[[], None]] = []
        self.reclaims = 0
        # what a cache for max_length positions really allocates (the model rounds up)
        self._cache_positions = cache_positions
        self._clock = clock
        self.idle_timeout = idle_timeout
        self._new_id = new_id
        self._sessions: dict[bytes, Session] = {}
        # bounds of meshnode.worker.limits: sessions per peer, lifetime of any session
        self.max_per_owner = max_per_owner
        self.max_age = max_age
        self._owned: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, owner: bytes, span: BlockSpan, max_length: int) -> Session:
        """Reserve the cache tokens of ``max_length`` positions and register a session
        (``NoCapacity`` if full, ``SessionLimit`` if ``owner`` holds ``max_per_owner``
        sessions already)."""
        if self._owned.get(owner, 0) >= self.max_per_owner:
            raise SessionLimit(f"at most {self.max_per_owner} open sessions per client")
        reserved = self._cache_positions(max_length)
        if reserved > self.budget.free and reserved <= self.budget.total:
            self._reclaim_for(reserved)
        try:
            self.budget.reserve(reserved)
        except NoCapacity as exc:
            text = str(exc) if reserved == max_length else (
                f"{exc} (max_length {max_length} takes {reserved})")
            retry_after = self.room_expected_in(reserved)
            if retry_after is None:
                raise NoCapacity(text) from None
            raise RetryLater(text, retry_after) from None
        session_id = self._new_id()
        while session_id in self._sessions:
            session_id = self._new_id()
        now = self._clock.seconds()
        session = Session(session_id, owner, span, max_length, now, opened=now, reserved=reserved)
        self._sessions[session_id] = session
        self._owned[owner] = self._owned.get(owner, 0) + 1
        return session

    def get(self, owner: bytes, session_id: bytes) -> Session:
        """The caller's open session, touched; ``UnknownSession`` otherwise."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner or session.closed:
            if session is None and session_id in self._reclaimed:
                raise UnknownSession(
                    f"session reclaimed under cache pressure after "
                    f"{self._reclaimed[session_id]:.1f} s without a step: open a new one")
            raise UnknownSession("no such session (unknown, closed or timed out)")
        session.last_used = self._clock.seconds()
        return session

    def begin_step(self, session: Session) -> None:
        session.busy = True

    def end_step(self, session: Session, cache: Any, new_position: int) -> None:
        """Record a finished step; frees the session if it was closed meanwhile."""
        session.busy = False
        session.cache = cache
        session.position = new_position
        session.steps += 1
        session.last_used = self._clock.seconds()
        if session.closed:
            self._free(session)

    def close(self, owner: bytes, session_id: bytes) -> None:
        """Close the caller's session (``UnknownSession`` if it has none by that id)."""
        self._close(self.get(owner, session_id))

    def expire_idle(self) -> list[Session]:
        """Close every idle session not busy with a step, and every session older than
        ``max_age`` (freed when its step ends); returns those closed."""
        now = self._clock.seconds()
        idle = [
            s
            for s in self._sessions.values()
            if not s.closed and (
                (not s.busy and now - s.last_used >= self.idle_timeout)
                or now - s.opened >= self.max_age
            )
        ]
        for session in idle:
            self._close(session)
        return idle

    def close_owned(self, owner: bytes) -> None:
        """Close every session of ``owner`` (its connection dropped: nobody can step them)."""
        for session in [s for s in self._sessions.values() if s.owner == owner]:
            self._close(session)

    def on_free(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a session's cache tokens go back to the budget."""
        self._free_listeners.append(listener)

    def room_expected_in(self, tokens: int) -> float | None:
        """Seconds until ``tokens`` can be had by reclaiming sessions that stay idle (0: now).

        ``None`` when they never can: reclaim is off, or ``tokens`` exceed the whole
        budget. When the sessions not busy now cannot make the room together, the
        guess is ``reclaim_idle`` (busy ones become candidates once their step ends).
        """
        if self.reclaim_idle is None or tokens > self.budget.total:
            return None
        room = self.budget.free
        if room >= tokens:
            return 0.0
        now = self._clock.seconds()
        for session in self._reclaim_order():
            room += session.reserved
            if room >= tokens:
                return max(0.0, session.last_used + self.reclaim_idle - now)
        return self.reclaim_idle

    def _reclaim_order(self) -> list[Session]:
        """Sessions that may ever be reclaimed, least recently stepped first."""
        candidates = [s for s in self._sessions.values() if not s.busy and not s.closed]
        return sorted(candidates, key=lambda s: s.last_used)

    def _reclaim_for(self, tokens: int) -> None:
        """Free idle sessions, least recently stepped first, if together they make room."""
        if self.reclaim_idle is None:
            return
        now = self._clock.seconds()
        idle = [s for s in self._reclaim_order() if now - s.last_used >= self.reclaim_idle]
        room, chosen = self.budget.free, []
        for session in idle:
            if room >= tokens:
                break
            room += session.reserved
            chosen.append(session)
        if room < tokens:
            return  # reclaiming would not make enough room: keep everyone's cache
        for session in chosen:
            self._reclaimed[session.session_id] = now - session.last_used
            while len(self._reclaimed) > REMEMBERED_RECLAIMS:
                self._reclaimed.popitem(last=False)
            self.reclaims += 1
            self._close(session)

    def owned_by(self, owner: bytes) -> int:
        return self._owned.get(owner, 0)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self._close(session)

    def _close(self, session: Session) -> None:
        session.closed = True
        if not session.busy:
            self._free(session)

    def _free(self, session: Session) -> None:
        if self._sessions.pop(session.session_id, None) is not None:
            release = getattr(session.cache, "release", None)
            if release is not None:
                release()
            session.cache = None
            self.budget.release(session.reserved)
            self._owned[session.owner] -= 1
            if not self._owned[session.owner]:
                del self._owned[session.owner]
            for listener in list(self._free_listeners):
                listener()
