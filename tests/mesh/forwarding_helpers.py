"""An in-memory mesh for forwarding tests: workers' real handlers, a fake compute, no sockets.

``MemoryNetwork`` routes ``request(address, message, timeout)`` to the handlers of
the node whose id the address pins, as the wire would: the caller's node id is
the ``PeerInfo`` the handler sees (TLS-verified in real life), a ``MeshError``
comes back as ``RemoteError(code, message)``, a node that is down refuses the
connection, a frozen one never answers (the request times out on the clock).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from meshnode.client.chain import InferenceChain
from meshnode.client.routing.route import Route, RouteHop
from meshnode.errors import ConnectionClosed, MeshError, RemoteError, RequestTimeout
from meshnode.identity import Identity, PeerAddress
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.wire.message import Message, PeerInfo
from meshnode.worker.budget import CacheBudget
from meshnode.worker.forwarding import ForwardingHandlers
from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
from meshnode.worker.sessions import SessionTable

H = 4
MODEL = "fp"
PUSH_TIMEOUT = 2.0
STEP_TIMEOUT = 60.0


class SpanFunction:
    """A fake span: ``x * 1.5 + start`` (so the order of hops matters); counts its steps."""

    hidden_size = H

    def __init__(self) -> None:
        self.steps = 0

    def new_cache(self, span: BlockSpan, max_length: int) -> Deferred:
        return succeed([])

    def forward(self, span: BlockSpan, hidden: Any, start: int, cache: Any) -> Deferred:
        self.steps += 1
        out = (np.asarray(hidden, np.float32) * 1.5 + span.start).astype(np.float32)
        return succeed((out, cache + list(range(start, start + hidden.shape[1]))))


def expected(hidden: np.ndarray, spans: list[BlockSpan]) -> list[np.ndarray]:
    """Each hop's input, then the chain's output, as the fake spans compute them."""
    seen = [hidden]
    for span in spans:
        seen.append((seen[-1] * 1.5 + span.start).astype(np.float32))
    return seen


class MemoryNode:
    """One node: an identity, an address, handlers, and requests sent through the network."""

    def __init__(self, network: MemoryNetwork, port: int):
        self.network = network
        self.identity = Identity.ephemeral()
        self.address = PeerAddress("127.0.0.1", port, self.identity.node_id)
        self.handlers: dict[str, Any] = {}
        self.sent: list[tuple[bytes, Message]] = []   # (to node id, message)

    def request(self, address: PeerAddress, message: Message,
                timeout: float = 30.0) -> Deferred[Message]:
        self.sent.append((address.node_id, message))
        return self.network.deliver(self, address, message, timeout)


class MemoryNetwork:
    """Nodes by id; ``down`` ones refuse connections, ``frozen`` ones never answer; the
    answers of ``slow`` ones to a node serving nothing (the client) come ``SLOW`` seconds
    late (or, if ``lose`` is set, never: the connection drops then)."""

    SLOW = 1.0

    def __init__(self) -> None:
        self.clock = Clock()
        self.nodes: dict[bytes, MemoryNode] = {}
        self.down: set[bytes] = set()
        self.frozen: set[bytes] = set()
        self.slow: set[bytes] = set()
        self.lose = False
        self._ports = itertools.count(7001)

    def node(self) -> MemoryNode:
        node = MemoryNode(self, next(self._ports))
        self.nodes[node.identity.node_id] = node
        return node

    def worker(self, span: BlockSpan) -> tuple[MemoryNode, InferenceHandlers, ForwardingHandlers]:
        node = self.node()
        ids = (i.to_bytes(16, "big") for i in itertools.count(1))
        table = SessionTable(CacheBudget(1000), self.clock, 600, new_id=lambda: next(ids))
        inference = InferenceHandlers(WorkerLimits(MODEL, span, 64, "float32"), table,
                                      SpanFunction())
        forwarding = ForwardingHandlers(inference, node, self.clock, PUSH_TIMEOUT)
        node.handlers = {**inference.handlers(), **forwarding.handlers()}
        return node, inference, forwarding

    def deliver(self, sender: MemoryNode, address: PeerAddress, message: Message,
                timeout: float) -> Deferred[Message]:
        target = self.nodes.get(address.node_id)
        if target is None or address.node_id in self.down:
            return fail(ConnectionClosed(f"cannot connect to {address}: refused"))
        if address.node_id in self.frozen:
            never: Deferred = Deferred()
            self.clock.callLater(timeout, lambda: never.called or never.errback(
                Failure(RequestTimeout(f"no answer from {address} in {timeout:g}s"))))
            return never
        peer = PeerInfo(sender.identity.node_id, "127.0.0.1", sender.address.port)
        handler = target.handlers[message.type]
        answer = maybeDeferred(handler, peer, message).addErrback(_as_remote)
        if address.node_id in self.slow and sender.identity.node_id not in self.nodes_serving():
            return answer.addBoth(self._late)
        return answer

    def nodes_serving(self) -> set[bytes]:
        return {n for n, node in self.nodes.items() if node.handlers}

    def _late(self, outcome: Any) -> Deferred:
        late: Deferred = Deferred()

        def arrive() -> None:
            if self.lose:
                late.errback(Failure(ConnectionClosed("connection lost")))
            elif isinstance(outcome, Failure):
                late.errback(outcome)
            else:
                late.callback(outcome)

        self.clock.callLater(self.SLOW, arrive)
        return late


def _as_remote(failure: Failure) -> Failure:
    error = failure.value
    if isinstance(error, MeshError):
        return Failure(RemoteError(error.code, str(error)))
    return Failure(RemoteError("internal", str(error)))


def hop(node: MemoryNode, span: BlockSpan) -> RouteHop:
    info = ServerInfo(str(node.address), span, WorkerState.ONLINE, 1.0, 1000, "float32", MODEL)
    return RouteHop(node.identity.node_id, info, span)


def chain_over(client: MemoryNode, hops: list[RouteHop], forwarding: bool = True,
               recovery: Any = None) -> InferenceChain:
    return InferenceChain(client, Route(tuple(hops), 0.0), MODEL, 32, STEP_TIMEOUT, recovery,
                          forwarding)


def result_of(d: Any) -> Any:
    """The value a Deferred (or coroutine) fired with already; raises its failure."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    got: list = []
    d.addBoth(got.append)
    assert got, "still waiting"
    if isinstance(got[0], Failure):
        got[0].raiseException()
    return got[0]
