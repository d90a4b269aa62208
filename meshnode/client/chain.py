"""Sessions along a route: ``SpanSession`` per worker, ``InferenceChain`` for the route.

A ``SpanSession`` is one worker's session over one span. It keeps every
hidden-state input it sent, in order (``history``): they are exactly what a
replacement worker needs to rebuild the cache of that span (replay, issue 6),
and the position of the next step is their total length.

An ``InferenceChain`` opens one session per hop (in parallel), runs each
step's new positions through the hops in order, and closes them all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.defer import Deferred, DeferredList

from meshnode.client.routing.route import Route, RouteHop
from meshnode.errors import BadRequest, ClientError
from meshnode.identity import PeerAddress
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.message import Message

#: seconds for one step on one worker, prefill included
DEFAULT_STEP_TIMEOUT = 60.0


class SpanSession:
    """One worker's session over ``hop.span``; records its inputs for replay."""

    def __init__(self, endpoint: Any, hop: RouteHop, max_length: int,
                 timeout: float = DEFAULT_STEP_TIMEOUT):
        self.endpoint = endpoint
        self.hop = hop
        self.address = PeerAddress.parse(hop.address)
        self.max_length = max_length
        self.timeout = timeout
        self.session_id: bytes | None = None
        self.history: list[np.ndarray] = []
        self.position = 0

    @property
    def span(self) -> BlockSpan:
        return self.hop.span

    async def open(self, model: str) -> None:
        reply = await self._request(messages.build_open(model, self.span, self.max_length))
        self.session_id = messages.parse_session_id(reply.fields)

    async def step(self, hidden: np.ndarray) -> np.ndarray:
        """Send new positions ``[1, T, H]``; returns this span's output for them."""
        if self.session_id is None:
            raise ClientError("step on a session that is not open")
        request = messages.build_step(self.session_id, self.span, self.position, hidden)
        reply = await self._request(request)
        if len(reply.tensors) != 1 or reply.tensors[0].shape != hidden.shape:
            raise BadRequest(f"worker {self.address} answered a step with a malformed tensor")
        self.history.append(hidden)
        self.position += hidden.shape[1]
        return reply.tensors[0]

    async def close(self) -> None:
        if self.session_id is not None:
            session_id, self.session_id = self.session_id, None
            await self._request(messages.build_close(session_id))

    def inputs(self) -> np.ndarray:
        """Every input sent so far as one ``[1, position, H]`` array (what a replay sends)."""
        return np.concatenate(self.history, axis=1)

    def _request(self, message: Message) -> Deferred[Message]:
        return self.endpoint.request(self.address, message, timeout=self.timeout)


class InferenceChain:
    """The sessions along ``route``: a remote forward over every block of the model."""

    def __init__(self, endpoint: Any, route: Route, model: str, max_length: int,
                 timeout: float = DEFAULT_STEP_TIMEOUT, recovery: Any = None):
        self.route = route
        self.model = model
        self.sessions = [SpanSession(endpoint, hop, max_length, timeout) for hop in route.hops]
        # ``meshnode.client.recovery.SpanRecovery``: replaces failed hops (None: fail)
        self.recovery = recovery
        self.abandoned: list[SpanSession] = []

    async def open(self) -> None:
        """Open every hop's session; on any failure close those opened and re-raise."""
        results = await DeferredList(
            [Deferred.fromCoroutine(s.open(self.model)) for s in self.sessions],
            consumeErrors=True,
        )
        failures = [result for ok, result in results if not ok]
        if failures and self.recovery is not None:
            failed = {i: result.value for i, (ok, result) in enumerate(results) if not ok}
            try:
                await self.recovery.reopen(self, failed)
            except BaseException:
                await self.close()
                raise
            return
        if failures:
            await self.close()
            failures[0].raiseException()

    async def forward(self, hidden: np.ndarray) -> np.ndarray:
        """New positions ``[1, T, H]`` through every hop in order."""
        if self.recovery is not None:
            return await self.recovery.forward(self, hidden)
        for session in self.sessions:
            hidden = await session.step(hidden)
        return hidden

    async def close(self) -> None:
        """Close every open session; errors are ignored (the worker's idle timeout frees it)."""
        await DeferredList(
            [Deferred.fromCoroutine(s.close()) for s in self.sessions + self.abandoned],
            consumeErrors=True,
        )

    @property
    def position(self) -> int:
        return self.sessions[0].position if self.sessions else 0
