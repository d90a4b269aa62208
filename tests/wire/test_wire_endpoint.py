"""Endpoint on real loopback TLS: pooling, both directions, misbehaving peers, big tensors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from zope.interface import implementer

from meshnode.errors import ConnectionClosed, RequestTimeout
from meshnode.identity import Identity, PeerAddress
from meshnode.tls import tls_factory
from meshnode.wire.endpoint import Endpoint
from meshnode.wire.frames import FrameDecoder
from meshnode.wire.header import decode_cbor
from meshnode.wire.limits import WireLimits
from meshnode.wire.message import Message

TIMEOUT = 10.0


def reactor():
    from twisted.internet import reactor

    return reactor


def within(deferred: Deferred) -> Deferred:
    return deferred.addTimeout(TIMEOUT, reactor())


def echo(peer, message):
    return Message(message.type, dict(message.fields), message.tensors)


async def listening(handlers: dict, limits: WireLimits = WireLimits()) -> Endpoint:
    endpoint = Endpoint(reactor(), Identity.ephemeral(), handlers, limits)
    await within(endpoint.listen("127.0.0.1"))
    return endpoint


async def close_all(*endpoints: Endpoint) -> None:
    await within(gatherResults([e.close() for e in endpoints]))


@implementer(IHandshakeListener)
class Misbehaving(Protocol):
    """A peer with a valid node certificate that sends an oversized length prefix."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.transport.write(struct.pack(">II", 16, 2**31))

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_misbehaving_connection_is_dropped_and_others_go_on():
    """When one peer sends an oversized prefix, then error and drop; others go on."""
    server = await listening({"echo": echo}, WireLimits(max_body_bytes=1 << 20))
    good = Endpoint(reactor(), Identity.ephemeral(), {})
    bad = Misbehaving()
    try:
        await within(good.request(server.address, Message("echo", {"n": 1})))
        factory = ClientFactory.forProtocol(lambda: bad)
        wrapped = tls_factory(Identity.ephemeral(), factory, True, reactor())
        reactor().connectTCP("127.0.0.1", server.address.port, wrapped)
        await within(bad.lost)
        (frame,) = FrameDecoder().feed(bad.received)
        assert decode_cbor(frame.header)["fields"]["code"] == "frame_too_large"
        reply = await within(good.request(server.address, Message("echo", {"n": 2})))
        assert reply.fields == {"n": 2}
    finally:
        await close_all(server, good)


@pytest_twisted.ensureDeferred
async def test_either_side_can_request_on_the_same_connection():
    """When A dialled B, then B's request to A reuses that connection."""
    a = await listening({"echo": echo})
    b = await listening({"echo": echo})
    try:
        await within(a.request(b.address, Message("echo", {"from": "a"})))
        unpinned_elsewhere = PeerAddress("127.0.0.1", 1, a.identity.node_id)
        reply = await within(b.request(unpinned_elsewhere, Message("echo", {"from": "b"})))
        assert reply.fields == {"from": "b"}
        assert len(a._protocols) == len(b._protocols) == 1
        assert b.stats_for(a.identity.node_id).frames_received == 2
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_peer_going_away_fails_pending_requests_and_notifies():
    """When the peer closes with a request pending, then ConnectionClosed and on_disconnect."""
    never = Deferred()
    server = await listening({"hang": lambda peer, message: never})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    gone = Deferred()
    client.on_disconnect(gone.callback)
    try:
        pending = client.request(server.address, Message("hang"))
        while not server.connection_stats():
            await within(_tick())
        await close_all(server)
        with pytest.raises(ConnectionClosed):
            await within(pending)
        assert await within(gone) == server.identity.node_id
        assert client.connection_stats() == {}
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_unanswered_request_times_out():
    """When the handler never answers, then RequestTimeout after the request's timeout."""
    server = await listening({"hang": lambda peer, message: Deferred()})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        with pytest.raises(RequestTimeout):
            await within(client.request(server.address, Message("hang"), timeout=0.3))
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_big_tensors_in_flight_arrive_intact():
    """When several 4 MiB tensors are sent at once, then flow control delivers each intact."""
    server = await listening({"sum": lambda p, m: Message("sum", {"s": float(m.tensors[0].sum())})})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        tensors = [np.full(1 << 20, i, np.float32) for i in range(6)]
        calls = [client.request(server.address, Message("sum", {}, (t,))) for t in tensors]
        replies = await within(gatherResults(calls))
        assert [r.fields["s"] for r in replies] == [float(i << 20) for i in range(6)]
        assert client.stats_for(server.identity.node_id).bytes_sent > 6 * 4 * 2**20
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_close_fails_later_requests():
    """When the endpoint is closed, then new requests fail with ConnectionClosed."""
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    await close_all(client)
    with pytest.raises(ConnectionClosed):
        await within(client.request(PeerAddress("127.0.0.1", 9), Message("x")))


def _tick() -> Deferred:
    deferred = Deferred()
    reactor().callLater(0.01, deferred.callback, None)
    return deferred
