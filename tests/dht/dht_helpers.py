"""An in-memory network of fake Endpoints on a ``task.Clock``, for DHT protocol tests.

``FakeEndpoint`` has the real Endpoint's interface (``listen``, ``request``,
``add_handler``, ``on_disconnect``, ``close``, ``identity``, ``address``):
requests are delivered after ``latency`` seconds of the fake clock, their
fields pass through CBOR like on the wire, handler errors come back as
``RemoteError``, a closed endpoint refuses connections (``ConnectionClosed``)
and tells every other endpoint it disconnected, a frozen one never answers
(``RequestTimeout``), and a pinned node id that does not match is refused
(``PeerIdMismatch``).
"""

from __future__ import annotations

from typing import Any

import cbor2
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from meshnode.dht.network import DHTNode
from meshnode.errors import ConnectionClosed, MeshError, PeerIdMismatch, RemoteError, RequestTimeout
from meshnode.identity import Identity, PeerAddress
from meshnode.wire.message import Message, PeerInfo

HOST = "127.0.0.1"


class FakeNetwork:
    """Endpoints reachable by (host, port), on one fake clock."""

    def __init__(self, clock: Clock, latency: float = 0.01) -> None:
        self.clock = clock
        self.latency = latency
        self.endpoints: dict[int, FakeEndpoint] = {}
        self.requests = 0
        self._next_port = 20000

    def endpoint(self, identity: Identity | None = None) -> FakeEndpoint:
        return FakeEndpoint(self, identity or Identity.ephemeral())

    def allocate_port(self) -> int:
        self._next_port += 1
        return self._next_port


class FakeEndpoint:
    """The Endpoint interface over ``FakeNetwork``."""

    def __init__(self, network: FakeNetwork, identity: Identity) -> None:
        self.network = network
        self.identity = identity
        self.address: PeerAddress | None = None
        self.closed = False
        self.frozen = False
        self._handlers: dict[str, Any] = {}
        self._disconnect_callbacks: list[Any] = []
        self._outgoing_port = network.allocate_port()

    def listen(self, host: str = HOST, port: int = 0) -> Deferred[PeerAddress]:
        port = port or self.network.allocate_port()
        self.network.endpoints[port] = self
        self.address = PeerAddress(host, port, self.identity.node_id)
        return succeed(self.address)

    def add_handler(self, type_: str, handler: Any) -> None:
        self._handlers[type_] = handler

    def on_disconnect(self, callback: Any) -> None:
        self._disconnect_callbacks.append(callback)

    def close(self) -> Deferred[None]:
        """Refuse connections from now on; every other endpoint sees a disconnect."""
        self.closed = True
        for other in list(self.network.endpoints.values()):
            if other is not self and not other.closed:
                for callback in other._disconnect_callbacks:
                    callback(self.identity.node_id)
        return succeed(None)

    def request(self, address: PeerAddress, message: Message, timeout: float) -> Deferred[Message]:
        clock, latency = self.network.clock, self.network.latency
        self.network.requests += 1
        calls: list[Any] = []
        answer: Deferred[Message] = Deferred(lambda _: [c.cancel() for c in calls if c.active()])

        def settle(outcome: Message | Failure) -> None:
            for call in calls:
                if call.active():
                    call.cancel()
            if not answer.called:
                if isinstance(outcome, Failure):
                    answer.errback(outcome)
                else:
                    answer.callback(outcome)

        def respond(outcome: Message | Failure) -> None:
            if isinstance(outcome, Failure):
                error = outcome.value
                code = error.code if isinstance(error, MeshError) else "internal"
                outcome = Failure(RemoteError(code, str(error)))
            else:
                outcome = _through_cbor(outcome)
            calls.append(clock.callLater(latency, settle, outcome))

        def deliver() -> None:
            target = self.network.endpoints.get(address.port)
            if target is None or target.closed or self.closed:
                settle(Failure(ConnectionClosed(f"cannot connect to {address}")))
                return
            if address.node_id is not None and address.node_id != target.identity.node_id:
                settle(Failure(PeerIdMismatch(f"{address} presented another node id")))
                return
            if target.frozen:
                return
            handler = target._handlers.get(message.type)
            if handler is None:
                respond(Failure(MeshError(f"no handler for {message.type}")))
                return
            peer = PeerInfo(self.identity.node_id, HOST, self._outgoing_port)
            maybeDeferred(handler, peer, _through_cbor(message)).addBoth(respond)

        calls.append(clock.callLater(latency, deliver))
        timeout_error = RequestTimeout(f"no answer from {address} in {timeout:g}s")
        calls.append(clock.callLater(timeout, lambda: settle(Failure(timeout_error))))
        return answer


def _through_cbor(message: Message) -> Message:
    return Message(message.type, cbor2.loads(cbor2.dumps(message.fields, canonical=True)))


def make_nodes(network: FakeNetwork, count: int, **options: Any) -> list[DHTNode]:
    """``count`` listening DHT nodes on ``network``, not yet bootstrapped."""
    nodes = []
    for _ in range(count):
        endpoint = network.endpoint()
        endpoint.listen()
        nodes.append(DHTNode(endpoint, network.clock, **options))
    return nodes


def settle(clock: Clock, d: Deferred, step: float = 0.01, limit: float = 600.0) -> Any:
    """Advance ``clock`` until ``d`` fires; its result (or raises its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    elapsed = 0.0
    while not results:
        if elapsed > limit:
            raise AssertionError(f"Deferred did not fire within {limit} fake seconds")
        clock.advance(step)
        elapsed += step
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def bootstrap_all(network: FakeNetwork, nodes: list[DHTNode]) -> None:
    """Join every node through the first, one after another."""
    seed = nodes[0].endpoint.address
    for node in nodes[1:]:
        settle(network.clock, node.bootstrap([seed]))


def run_for(clock: Clock, seconds: float, step: float = 0.05) -> None:
    """Advance ``clock`` by ``seconds`` in small steps, so chains of calls progress."""
    end = clock.seconds() + seconds
    while clock.seconds() < end:
        clock.advance(min(step, end - clock.seconds()))
