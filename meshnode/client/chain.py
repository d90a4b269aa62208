"""Sessions along a route: ``SpanSession`` per worker, ``InferenceChain`` for the route.

A ``SpanSession`` is one worker's session over one span. It keeps every
hidden-state input it sent, in order (``history``): they are exactly what a
replacement worker needs to rebuild the cache of that span (replay, issue 6),
and the position of the next step is their total length.

An ``InferenceChain`` opens one session per hop (in parallel), runs each
step's new positions through the hops in order, and closes them all.

With ``forwarding`` (the default), a step goes client -> A -> B -> C -> client:
the step to the first hop carries the rest of the route (each later hop's
pinned address, session and a capability this client made with that
session's push key, for the hop before as sender and this position); at the same
time the client asks each later hop for its output (``infer.wait``, no
tensor). The first hop answers with its output, each later hop's wait with
its own: the client so records every hop's input (the output of the hop
before) for replay, and the last answer is the chain's output. A reply that
reports a failed push (``forward_error``) makes that next hop the failed one
(``ForwardFailed`` naming it), the outputs up to there are kept, and the step
goes on from the failed hop once recovery has replaced it. Without
forwarding (``forwarding=False``, a route that visits one worker twice in
a row, or a worker that gave no push key) the client calls each hop in
turn, as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode.client.routing.route import Route, RouteHop
from meshnode.errors import BadRequest, ClientError, ForwardFailed
from meshnode.identity import NodeID, PeerAddress
from meshnode.inference import capabilities, messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.message import Message

#: seconds for one step on one worker, prefill included
DEFAULT_STEP_TIMEOUT = 60.0
#: a history entry whose input never reached the client
LOST = object()

log = Logger()


class HopFailure(Exception):
    """Control flow of a step: hop ``index`` failed with ``error`` (what recovery judges);
    ``input`` is that hop's input, from which the step goes on once it is replaced."""

    def __init__(self, index: int, error: BaseException, hidden: np.ndarray):
        super().__init__(str(error) or type(error).__name__)
        self.index, self.error, self.input = index, error, hidden


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
        # what this session's capabilities are made with (None: the worker does not forward)
        self.push_key: bytes | None = None
        # inputs in order; with forwarding an entry may still be on its way (a Deferred that
        # puts the array in its place), or LOST when the hop before died before sending it
        self.history: list[Any] = []
        self.position = 0

    @property
    def span(self) -> BlockSpan:
        return self.hop.span

    async def open(self, model: str) -> None:
        reply = await self._request(messages.build_open(model, self.span, self.max_length))
        self.session_id = messages.parse_session_id(reply.fields)
        self.push_key = messages.parse_push_key(reply.fields)

    async def step(self, hidden: np.ndarray) -> np.ndarray:
        """Send new positions ``[1, T, H]``; returns this span's output for them."""
        if self.session_id is None:
            raise ClientError("step on a session that is not open")
        request = messages.build_step(self.session_id, self.span, self.position, hidden)
        reply = await self._request(request)
        if len(reply.tensors) != 1 or reply.tensors[0].shape != hidden.shape:
            raise BadRequest(f"worker {self.address} answered a step with a malformed tensor")
        self.record(hidden)
        return reply.tensors[0]

    def record(self, hidden: np.ndarray) -> None:
        """The worker ran ``hidden`` ``[1, T, H]``: it joins the history, the position moves."""
        self.history.append(hidden)
        self.position += hidden.shape[1]

    def record_coming(self, reply: Deferred[Message], shape: tuple[int, ...]) -> None:
        """The worker ran an input of ``shape`` that the client receives in ``reply`` (the hop
        before's answer, still on its way): the position moves now, the entry fills in later
        (or becomes ``LOST`` if the reply fails)."""
        index = len(self.history)
        self.history.append(reply)
        self.position += shape[1]

        def arrived(message: Message) -> None:
            try:
                output, error = messages.parse_output(message, shape)
            except BadRequest as exc:
                log.warn("{hop}'s input came malformed: {e}", hop=str(self.address), e=str(exc))
                self.history[index] = LOST
                return
            if error is not None:
                log.warn("late forward_error after the chain's output came: {e}",
                         e=error.get("message"))
            self.history[index] = output

        def lost(failure: Any) -> None:
            log.warn("the input of {hop} at its step {i} never came: {e}",
                     hop=str(self.address), i=index, e=failure.getErrorMessage())
            self.history[index] = LOST

        reply.addCallbacks(arrived, lost)

    async def settle(self) -> None:
        """Wait until every input of the history is in (or ``LOST``)."""
        coming = [entry for entry in self.history if isinstance(entry, Deferred)]
        if coming:
            await DeferredList(coming, consumeErrors=True)

    def step_request(self, hidden: np.ndarray,
                     forward: tuple[messages.ForwardHop, ...]) -> Deferred[Message]:
        """The raw step to the first hop of a forwarded step (the caller reads the reply)."""
        if self.session_id is None:
            raise ClientError("step on a session that is not open")
        return self._request(
            messages.build_step(self.session_id, self.span, self.position, hidden, forward))

    def wait_request(self) -> Deferred[Message]:
        """Ask for this hop's output of the step at its position (pushed by the hop before)."""
        if self.session_id is None:
            raise ClientError("wait on a session that is not open")
        return self._request(messages.build_wait(self.session_id, self.position))

    def forward_hop(self, owner: NodeID, sender: NodeID) -> messages.ForwardHop:
        """This hop as the hop before must name it, with our capability for ``sender``;
        ``owner``: our node id (the session's owner)."""
        if self.session_id is None or self.push_key is None:
            raise ClientError("forward to a session that is not open, or takes no pushes")
        capability = capabilities.issue(owner, self.push_key, sender, self.position)
        return messages.ForwardHop(self.address, self.session_id, self.span, capability)

    async def close(self) -> None:
        if self.session_id is not None:
            session_id, self.session_id = self.session_id, None
            await self._request(messages.build_close(session_id))

    def inputs(self) -> np.ndarray:
        """Every input sent so far as one ``[1, position, H]`` array (what a replay sends);
        ``settle()`` first when forwarding. ``ClientError`` if one was lost."""
        if any(isinstance(entry, Deferred) for entry in self.history):
            raise ClientError(f"inputs of {self.address} still on their way: settle() first")
        if any(entry is LOST for entry in self.history):
            raise ClientError(f"an input of {self.address} was lost (the worker before it died "
                              f"before sending it): its span cannot be replayed")
        return np.concatenate(self.history, axis=1)

    def _request(self, message: Message) -> Deferred[Message]:
        return self.endpoint.request(self.address, message, timeout=self.timeout)


class InferenceChain:
    """The sessions along ``route``: a remote forward over every block of the model."""

    def __init__(self, endpoint: Any, route: Route, model: str, max_length: int,
                 timeout: float = DEFAULT_STEP_TIMEOUT, recovery: Any = None,
                 forwarding: bool = True):
        self.route = route
        self.model = model
        self.endpoint = endpoint
        self.sessions = [SpanSession(endpoint, hop, max_length, timeout) for hop in route.hops]
        # ``meshnode.client.recovery.SpanRecovery``: replaces failed hops (None: fail)
        self.recovery = recovery
        self.forwarding = forwarding
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
        index = 0
        while index < len(self.sessions):
            try:
                hidden, index = await self.advance(index, hidden)
            except HopFailure as failure:
                raise failure.error from None
        return hidden

    async def advance(self, index: int, hidden: np.ndarray) -> tuple[np.ndarray, int]:
        """Run the step from hop ``index`` (its input ``hidden``) as far as it goes at once:
        through every later hop when forwarding, else through that hop alone. Returns the
        output and the index of the next hop to run; ``HopFailure`` names the hop that failed.
        """
        sessions = self.sessions[index:]
        if self.forwarding and len(sessions) > 1 and _forwardable(sessions):
            return await self._forwarded(index, hidden), len(self.sessions)
        try:
            return await sessions[0].step(hidden), index + 1
        except Exception as error:
            raise HopFailure(index, error, hidden) from error

    async def _forwarded(self, index: int, hidden: np.ndarray) -> np.ndarray:
        """One forwarded step from hop ``index`` to the last: a step to the first (with the
        rest of the route) and a wait to each later hop, sent at once."""
        sessions = self.sessions[index:]
        start = sessions[0].position
        if any(s.position != start for s in sessions):
            raise ClientError(f"hops of one chain at different positions: "
                              f"{[s.position for s in sessions]}")
        owner = self.endpoint.identity.node_id
        hops = tuple(s.forward_hop(owner, before.hop.node_id)
                     for before, s in zip(sessions, sessions[1:]))
        requests = [sessions[0].step_request(hidden, hops)]
        requests += [s.wait_request() for s in sessions[1:]]
        news = await _first_news(requests)
        if news is _TROUBLE:  # a hop before the last failed, or could not push on
            return await self._failed(index, sessions, requests, hidden, None)
        try:
            (last,) = news
            if isinstance(last, Failure):
                last.raiseException()
            output, _ = messages.parse_output(last, hidden.shape)
        except Exception as last_error:
            return await self._failed(index, sessions, requests, hidden, last_error)
        # Every hop ran: the step is done. The answers of the hops before the last (their
        # outputs: the next hops' inputs) fill the history as they come, off the critical path.
        sessions[0].record(hidden)
        for session, reply in zip(sessions[1:], requests):
            session.record_coming(reply, hidden.shape)
        return output

    async def _failed(self, index: int, sessions: list[SpanSession], requests: list[Deferred],
                      hidden: np.ndarray, last_error: Exception | None) -> np.ndarray:
        """The last hop gave no output (``last_error``): the first hop that failed, in order,
        is the one named (``HopFailure``); the hops before it ran and are recorded."""
        try:
            for offset, (session, request) in enumerate(zip(sessions[:-1], requests)):
                try:
                    (outcome,) = await _outcome(request)
                    if isinstance(outcome, Failure):
                        outcome.raiseException()
                    output, error = messages.parse_output(outcome, hidden.shape)
                except Exception as exc:
                    raise HopFailure(index + offset, exc, hidden) from exc
                session.record(hidden)
                hidden = output
                if error is not None:
                    raise HopFailure(index + offset + 1, forward_failed(error), hidden)
            if last_error is None:  # the trouble was not where it was reported: the last hop
                last_error = ClientError("the last hop's answer went missing")
            raise HopFailure(index + len(sessions) - 1, last_error, hidden) from last_error
        finally:
            for request in requests:  # those not awaited: a hop before failed
                request.addErrback(lambda _: None)
                request.cancel()

    async def close(self) -> None:
        """Close every open session; errors are ignored (the worker's idle timeout frees it)."""
        await DeferredList(
            [Deferred.fromCoroutine(s.close()) for s in self.sessions + self.abandoned],
            consumeErrors=True,
        )

    @property
    def position(self) -> int:
        return self.sessions[0].position if self.sessions else 0


_TROUBLE = object()


def _outcome(request: Deferred) -> Deferred:
    """Fires with ``[request's result]`` (a reply or a ``Failure``), leaving ``request``'s own
    result as it is: a request watched by several readers is never awaited itself."""
    seen: Deferred = Deferred()

    def tell(result: Any) -> Any:
        seen.callback([result])
        return result

    request.addBoth(tell)
    return seen


def _first_news(requests: list[Deferred]) -> Deferred:
    """Fires with ``[the last request's outcome]`` (reply or ``Failure``), or ``_TROUBLE`` as
    soon as an earlier one fails or reports a ``forward_error``, whichever comes first: a
    failure anywhere is acted on at once, not after the last hop's timeout. The requests'
    own results pass through untouched."""
    news: Deferred = Deferred()

    def tell(value: Any) -> None:
        if not news.called:
            news.callback(value)

    def reply(message: Any) -> Any:
        if isinstance(message, Message) and "forward_error" in message.fields:
            tell(_TROUBLE)
        return message

    def failed(failure: Failure) -> Failure:
        tell(_TROUBLE)
        return failure

    for request in requests[:-1]:
        request.addCallbacks(reply, failed)

    def last(outcome: Any) -> Any:
        tell([outcome])
        return outcome

    requests[-1].addBoth(last)
    return news


def forward_failed(error: dict) -> ForwardFailed:
    """The client's view of a worker's ``forward_error``: the next hop failed."""
    address, code = error.get("address", "?"), error.get("code", "internal")
    return ForwardFailed(
        f"the worker before {address} could not push to it: {code}: {error.get('message', '')}",
        error.get("node", b""), address, code)


def _forwardable(sessions: list[SpanSession]) -> bool:
    """Whether every later hop takes pushes and no worker follows itself (it would have to
    push into its own session)."""
    return all(b.push_key is not None and a.hop.node_id != b.hop.node_id
               for a, b in zip(sessions, sessions[1:]))
