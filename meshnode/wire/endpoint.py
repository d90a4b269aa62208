"""``Endpoint``: the wire's facade. Listen, dial, one connection per peer, handlers.

Usage::

    endpoint = Endpoint(reactor, Identity.ephemeral(), {"echo": echo_handler})
    address = await endpoint.listen("127.0.0.1")          # host:port#<our node id>
    reply = await other.request(address, Message("echo", {"n": 1}, (array,)))

Connections are pooled by the peer's node id, whichever side dialled: a
request to a node we already share a verified connection with reuses it, and
concurrent requests to an address being dialled share the dial. Every
request carries a timeout that covers the dial as well.

With a ``swarm`` (a ``meshnode.swarm.policy.SwarmPolicy``), every connection,
dialled or accepted, must pass ``swarm.check_peer`` at the handshake, and
after each reload of the swarm's revocation list connections whose peer no
longer passes are dropped (``recheck_peers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode.errors import ConnectionClosed, MeshError, RequestTimeout
from meshnode.identity import Identity, NodeID, PeerAddress
from meshnode.tls import tls_factory
from meshnode.wire.limits import DEFAULT_REQUEST_TIMEOUT, WireLimits
from meshnode.wire.message import ConnectionStats, Handler, Message
from meshnode.wire.protocol import MeshProtocol

log = Logger()

CLOSE_GRACE = 2.0  # seconds a closing connection may take to flush before it is aborted
_DialKey = tuple[str, int, NodeID | None]


class _Dial:
    """One outgoing connection attempt and the callers waiting on it."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[MeshProtocol]] = []
        self.connector: Any = None

    def settle(self, outcome: MeshProtocol | Failure) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> MeshProtocol:
        return self.endpoint._new_protocol(None)


class _DialFactory(ClientFactory):
    noisy = False

    def __init__(self, endpoint: Endpoint, key: _DialKey, dial: _Dial) -> None:
        self.endpoint, self.key, self.dial = endpoint, key, dial

    def buildProtocol(self, addr: Any) -> MeshProtocol:
        return self.endpoint._new_protocol(self.key[2], self.key, self.dial)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        error = ConnectionClosed(f"cannot connect to {self.key[0]}:{self.key[1]}: "
                                 f"{reason.getErrorMessage()}")
        self.endpoint._dial_done(Failure(error), self.key, self.dial)


class Endpoint:
    """A node's presence on the wire: serves ``handlers`` and sends requests to peers."""

    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        handlers: Mapping[str, Handler] | None = None,
        limits: WireLimits = WireLimits(),
        clock: Any = None,
        swarm: Any = None,
    ) -> None:
        self.reactor = reactor
        self.swarm = swarm
        if swarm is not None:
            swarm.on_reload(self.recheck_peers)
        self.clock = clock if clock is not None else reactor
        self.identity = identity
        self.limits = limits
        self.address: PeerAddress | None = None
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._disconnect_callbacks: list[Callable[[NodeID], None]] = []
        self._by_node: dict[NodeID, MeshProtocol] = {}
        self._by_address: dict[_DialKey, MeshProtocol] = {}
        self._dials: dict[_DialKey, _Dial] = {}
        self._protocols: set[MeshProtocol] = set()
        self._listening_port: Any = None
        self._closing = False

    # -- public API ------------------------------------------------------

    def listen(self, host: str, port: int = 0) -> Deferred[PeerAddress]:
        """Accept connections on ``host:port`` (0: an ephemeral port); fires with our address."""
        factory = tls_factory(self.identity, _ServerFactory(self), False, self.clock)
        try:
            self._listening_port = self.reactor.listenTCP(port, factory, interface=host)
        except Exception as exc:  # CannotListenError and friends
            return defer.fail(exc)
        bound = self._listening_port.getHost()
        self.address = PeerAddress(host, bound.port, self.identity.node_id)
        return defer.succeed(self.address)

    def request(
        self, address: PeerAddress, message: Message, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Deferred[Message]:
        """Send ``message`` to the peer at ``address``; fires with its response.

        Fails with ``RemoteError(code, message)``, ``RequestTimeout``,
        ``ConnectionClosed`` or ``PeerIdMismatch``.
        """
        if self._closing:
            return defer.fail(ConnectionClosed("endpoint is closed"))
        started = self.clock.seconds()
        connected = self._connection_to(address, timeout)

        def send(protocol: MeshProtocol) -> Deferred[Message]:
            remaining = max(0.0, timeout - (self.clock.seconds() - started))
            return protocol.request(message, remaining)

        return connected.addCallback(send)

    def add_handler(self, type: str, handler: Handler) -> None:
        """Serve requests of ``type`` with ``handler`` (replacing any previous one)."""
        self._handlers[type] = handler

    def on_disconnect(self, callback: Callable[[NodeID], None]) -> None:
        """Call ``callback(node_id)`` whenever a verified connection to a peer is lost."""
        self._disconnect_callbacks.append(callback)

    def recheck_peers(self) -> int:
        """Refuse (with an error frame, then close) every connected peer that no longer
        passes the swarm's check; returns how many were dropped."""
        if self.swarm is None:
            return 0
        dropped = 0
        for protocol in list(self._protocols):
            if protocol.peer is None or not protocol.connected:
                continue
            try:
                self.swarm.check_peer(protocol.peer_certificate, protocol.peer.node_id)
            except MeshError as exc:
                protocol.refuse_peer(exc)
                dropped += 1
        return dropped

    def connection_stats(self) -> dict[NodeID, ConnectionStats]:
        """Bytes and frames sent/received on the pooled connection to each peer."""
        return {node_id: protocol.stats for node_id, protocol in self._by_node.items()}

    def stats_for(self, node_id: NodeID) -> ConnectionStats | None:
        """Counters of the pooled connection to ``node_id``, if there is one."""
        protocol = self._by_node.get(node_id)
        return protocol.stats if protocol is not None else None

    def close(self) -> Deferred[None]:
        """Stop listening, close every connection, fail pending requests; fires when done."""
        self._closing = True
        waits: list[Deferred[Any]] = []
        if self._listening_port is not None:
            waits.append(defer.maybeDeferred(self._listening_port.stopListening))
            self._listening_port = None
        for dial in list(self._dials.values()):
            if dial.connector is not None:
                dial.connector.disconnect()
            dial.settle(Failure(ConnectionClosed("endpoint is closed")))
        self._dials.clear()
        for protocol in list(self._protocols):
            waits.append(self._close_protocol(protocol))
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- pool --------------------------------------------------------------

    def _connection_to(self, address: PeerAddress, timeout: float) -> Deferred[MeshProtocol]:
        key: _DialKey = (address.host, address.port, address.node_id)
        existing = self._by_node.get(address.node_id) if address.node_id else None
        existing = existing or self._by_address.get(key)
        if existing is not None and existing.usable:
            return defer.succeed(existing)
        dial = self._dials.get(key)
        if dial is None:
            dial = self._dials[key] = _Dial()
            factory = tls_factory(self.identity, _DialFactory(self, key, dial), True, self.clock)
            dial.connector = self.reactor.connectTCP(
                address.host, address.port, factory, timeout=self.limits.connect_timeout
            )
        return self._wait_for(dial, address, timeout)

    def _wait_for(
        self, dial: _Dial, address: PeerAddress, timeout: float
    ) -> Deferred[MeshProtocol]:
        timer: IDelayedCall | None = None

        def give_up(waiter: Deferred[MeshProtocol]) -> None:
            if waiter in dial.waiters:
                dial.waiters.remove(waiter)
            if timer is not None and timer.active():
                timer.cancel()

        waiter: Deferred[MeshProtocol] = Deferred(give_up)

        def timed_out() -> None:
            if waiter in dial.waiters:
                dial.waiters.remove(waiter)
                error = RequestTimeout(f"no connection to {address} in {timeout:g}s")
                waiter.errback(Failure(error))

        def stop_timer(result: Any) -> Any:
            if timer is not None and timer.active():
                timer.cancel()
            return result

        timer = self.clock.callLater(timeout, timed_out)
        dial.waiters.append(waiter)
        return waiter.addBoth(stop_timer)

    def _dial_done(self, outcome: MeshProtocol | Failure, key: _DialKey, dial: _Dial) -> None:
        if self._dials.get(key) is dial:
            del self._dials[key]
        if not isinstance(outcome, Failure):
            self._by_address[key] = outcome
        dial.settle(outcome)

    def _new_protocol(
        self, expected_id: NodeID | None, key: _DialKey | None = None, dial: _Dial | None = None
    ) -> MeshProtocol:
        check = self.swarm.check_peer if self.swarm is not None else None
        protocol = MeshProtocol(self.clock, self.limits, self._handlers.get, expected_id, check)
        self._protocols.add(protocol)
        protocol.ready.addCallback(self._register)
        if dial is not None:
            protocol.ready.addBoth(self._dial_done, key, dial)
        else:
            protocol.ready.addErrback(self._refused)
        protocol.closed.addCallback(self._forget, protocol)
        return protocol

    def _register(self, protocol: MeshProtocol) -> MeshProtocol:
        if self._closing:
            protocol.close()
            return protocol
        self._by_node.setdefault(protocol.peer.node_id, protocol)
        return protocol

    def _refused(self, failure: Failure) -> None:
        log.info("refused an incoming connection: {error}", error=failure.getErrorMessage())

    def _forget(self, _: None, protocol: MeshProtocol) -> None:
        self._protocols.discard(protocol)
        for key, known in list(self._by_address.items()):
            if known is protocol:
                del self._by_address[key]
        if protocol.peer is None:
            return
        node_id = protocol.peer.node_id
        if self._by_node.get(node_id) is protocol:
            del self._by_node[node_id]
            replacement = next(
                (p for p in self._protocols if p.usable and p.peer.node_id == node_id), None
            )
            if replacement is not None:
                self._by_node[node_id] = replacement
                return
            for callback in list(self._disconnect_callbacks):
                try:
                    callback(node_id)
                except Exception:
                    log.failure("on_disconnect callback failed")

    def _close_protocol(self, protocol: MeshProtocol) -> Deferred[None]:
        closed = Deferred()
        protocol.closed.addBoth(lambda _: closed.called or closed.callback(None))
        if not protocol.connected:
            return defer.succeed(None)
        protocol.close()
        abort = self.clock.callLater(CLOSE_GRACE, _abort, protocol)
        closed.addBoth(lambda _: abort.active() and abort.cancel())
        return closed


def _abort(protocol: MeshProtocol) -> None:
    if protocol.connected:
        protocol.transport.abortConnection()
