"""Fault recovery on the client: bans, replacement routes for one span, and replay.

When a worker of a chain dies, resets the connection, times out or answers a
step with an error, or when the worker before it reports that it could not
push the step into it (``ForwardFailed``, with forwarding: the hop named
there is the failed one, not the messenger), ``SpanRecovery``:

1. bans it in the client's ``BanList`` (for ``base`` seconds, doubling on each
   repeat within ``forget_after``, capped at ``maximum``);
2. finds a replacement route for exactly that span's blocks
   (``discover_route`` with that span: the same Dijkstra as a whole route, over
   the workers' spans clipped to the span; the replacement may split it over
   several workers), polling the DHT for at most ``route_wait`` seconds, after which
   it gives up with ``RouteNotFound.missing`` naming the uncovered blocks;
3. opens a session on each replacement worker and replays the failed
   session's recorded inputs (``SpanSession.inputs()``) through them in order,
   which rebuilds their KV caches to the position the chain had reached;
4. hands the new sessions to the chain, which retries the step there (and,
   with forwarding, forwards it on from there).

A replacement that fails in turn is banned too and the next one tried, at
most ``max_attempts`` times per failure. Every request carries the chain's
step timeout, so a stopped (SIGSTOP) worker costs one timeout, never a hang.
The abandoned session is closed best-effort with a short timeout when the
chain closes (the worker's idle timeout frees it otherwise).

The pure part (``BanList``) takes an injected clock and no network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from meshnode.client.chain import HopFailure, SpanSession
from meshnode.client.defaults import ROUTE_WAIT
from meshnode.client.routing.discovery import ROUTE_POLL_INTERVAL, discover_route, wait_for_route
from meshnode.client.routing.route import NodeID, Route
from meshnode.errors import ClientError, MeshError, RouteNotFound
from meshnode.inference.directory import KeyFor
from meshnode.inference.records import BlockSpan

#: first ban of a worker (seconds); each repeat doubles it, up to ``MAX_BAN``
BASE_BAN = 15.0
BAN_GROWTH = 2.0
MAX_BAN = 600.0
#: seconds a worker must stay unbanned before its strikes are forgotten
FORGET_AFTER = 600.0
#: replacements tried for one failure before giving up
MAX_ATTEMPTS = 6
#: seconds a best-effort close of an abandoned session may take
ABANDONED_CLOSE_TIMEOUT = 2.0

log = Logger()


class BanList:
    """Workers not to route through for a while; bans grow on repeats. Pure."""

    def __init__(
        self,
        clock: Any,
        base: float = BASE_BAN,
        growth: float = BAN_GROWTH,
        maximum: float = MAX_BAN,
        forget_after: float = FORGET_AFTER,
    ):
        self._clock = clock
        self.base, self.growth, self.maximum = base, growth, maximum
        self.forget_after = forget_after
        self._strikes: dict[NodeID, int] = {}
        self._until: dict[NodeID, float] = {}

    def ban(self, node_id: NodeID) -> float:
        """Ban ``node_id`` now; returns the ban's length in seconds."""
        now = self._clock.seconds()
        if now - self._until.get(node_id, now) > self.forget_after:
            self._strikes.pop(node_id, None)
        strikes = self._strikes.get(node_id, 0) + 1
        self._strikes[node_id] = strikes
        duration = min(self.base * self.growth ** (strikes - 1), self.maximum)
        self._until[node_id] = max(self._until.get(node_id, now), now + duration)
        return duration

    def is_banned(self, node_id: NodeID) -> bool:
        return self._until.get(node_id, float("-inf")) > self._clock.seconds()

    def strikes(self, node_id: NodeID) -> int:
        return self._strikes.get(node_id, 0)

    def banned(self) -> frozenset[NodeID]:
        """Workers banned now; forgets those whose strikes have lapsed (bounded memory)."""
        now = self._clock.seconds()
        for node_id, until in list(self._until.items()):
            if now - until > self.forget_after:
                del self._until[node_id]
                self._strikes.pop(node_id, None)
        return frozenset(n for n, until in self._until.items() if until > now)


@dataclasses.dataclass(frozen=True)
class RecoveryOptions:
    """How hard a client tries before a generation fails."""

    max_attempts: int = MAX_ATTEMPTS
    route_wait: float = ROUTE_WAIT
    poll_interval: float = ROUTE_POLL_INTERVAL


class _HopFailed(Exception):
    """A replacement session failed while opening or replaying."""

    def __init__(self, session: SpanSession, error: BaseException):
        super().__init__(str(error))
        self.session, self.error = session, error


def recoverable(error: BaseException) -> bool:
    """Failures a worker is to blame for: network, timeout, error frame, bad answer."""
    return isinstance(error, MeshError) and not isinstance(error, ClientError)


class SpanRecovery:
    """Replaces failed sessions of a chain: ban, re-route the span, replay, go on."""

    def __init__(
        self,
        endpoint: Any,
        dht: Any,
        clock: Any,
        key_for: KeyFor,
        model: str,
        bans: BanList,
        options: RecoveryOptions = RecoveryOptions(),
        forwarding: bool = False,
    ):
        self.endpoint, self.dht, self.clock = endpoint, dht, clock
        self.key_for, self.model = key_for, model
        self.bans = bans
        self.options = options
        # steps pass worker to worker: replacement routes count the links between hops
        self.forwarding = forwarding
        self.replacements = 0

    async def forward(self, chain: Any, hidden: np.ndarray) -> np.ndarray:
        """``chain.forward`` with recovery: a failed hop is replaced and the step goes on
        from it (with forwarding, the hops before it have run and their outputs are in)."""
        index, failures = 0, 0
        while index < len(chain.sessions):
            try:
                hidden, index = await chain.advance(index, hidden)
            except HopFailure as failure:
                failures += 1
                error = failure.error
                if not recoverable(error) or failures > self.options.max_attempts:
                    raise error from None
                index, hidden = failure.index, failure.input
                chain.sessions[index : index + 1] = await self.replace(
                    chain.sessions[index], error, chain.abandoned
                )
        return hidden

    async def reopen(self, chain: Any, failed: Mapping[int, BaseException]) -> None:
        """After ``chain.open``: replace the hops whose open failed (nothing to replay)."""
        for index in sorted(failed, reverse=True):
            error = failed[index]
            if not recoverable(error):
                raise error
            chain.sessions[index : index + 1] = await self.replace(
                chain.sessions[index], error, chain.abandoned
            )

    async def replace(
        self, failed: SpanSession, error: BaseException, abandoned: list[SpanSession]
    ) -> list[SpanSession]:
        """Open and replay replacement sessions for ``failed``'s span (after banning it)."""
        timeout = failed.timeout  # before _drop shortens it for the abandoned session's close
        self._drop(failed, error, abandoned)
        await failed.settle()  # with forwarding, its last inputs may still be on their way
        inputs = failed.inputs() if failed.history else None
        deadline = self.clock.seconds() + self.options.route_wait
        for _ in range(self.options.max_attempts):
            try:
                route = await self.wait_for_span_route(failed.span, failed.max_length, deadline)
            except RouteNotFound as exc:
                raise RouteNotFound(
                    f"the worker of blocks {failed.span} failed ({_said(error)}) and no other "
                    f"took them over within {self.options.route_wait:g} s: {exc}",
                    exc.missing,
                ) from error
            sessions = [
                SpanSession(self.endpoint, hop, failed.max_length, timeout) for hop in route.hops
            ]
            try:
                await self._open_all(sessions)
                if inputs is not None:
                    await _replay(sessions, inputs)
            except _HopFailed as hop_failure:
                for other in sessions:
                    if other is not hop_failure.session:
                        _abandon(other, abandoned)
                self._drop(hop_failure.session, hop_failure.error, abandoned)
                continue
            self.replacements += 1
            log.info("span {span} moved to {route}", span=str(failed.span), route=route.describe())
            return sessions
        raise ClientError(
            f"span {failed.span}: {self.options.max_attempts} replacements failed in a row"
        ) from error

    async def wait_for_span_route(self, span: BlockSpan, max_length: int, deadline: float) -> Route:
        """Poll the DHT until ``span`` is covered by workers not banned, or ``RouteNotFound``."""

        def discover() -> Any:
            return discover_route(
                self.dht, self.endpoint, self.clock, self.key_for, span, self.model,
                self.bans.banned(), max_length, forwarding=self.forwarding,
            )

        return await wait_for_route(discover, self.clock, deadline, self.options.poll_interval)

    def _drop(
        self, session: SpanSession, error: BaseException, abandoned: list[SpanSession]
    ) -> None:
        duration = self.bans.ban(session.hop.node_id)
        log.warn(
            "worker {worker} failed on span {span} ({error}); banned for {ban:g} s",
            worker=session.hop.node_id.hex()[:12],
            span=str(session.span),
            error=_said(error),
            ban=duration,
        )
        _abandon(session, abandoned)

    async def _open_all(self, sessions: list[SpanSession]) -> None:
        results = await DeferredList(
            [Deferred.fromCoroutine(s.open(self.model)) for s in sessions], consumeErrors=True
        )
        for session, (ok, result) in zip(sessions, results):
            if not ok:
                if not recoverable(result.value):
                    result.raiseException()
                raise _HopFailed(session, result.value)


def _said(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _abandon(session: SpanSession, abandoned: list[SpanSession]) -> None:
    """Leave ``session`` to be closed with the chain, quickly: its worker may be gone."""
    session.timeout = min(session.timeout, ABANDONED_CLOSE_TIMEOUT)
    abandoned.append(session)


async def _replay(sessions: list[SpanSession], inputs: np.ndarray) -> None:
    """Rebuild the caches: the recorded inputs through the new sessions, in order."""
    hidden = inputs
    for session in sessions:
        try:
            hidden = await session.step(hidden)
        except Exception as error:
            if not recoverable(error):
                raise
            raise _HopFailed(session, error) from error
