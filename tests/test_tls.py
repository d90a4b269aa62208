"""Mutual TLS 1.3 on real loopback sockets: certificates required, node ids bound and pinned."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from meshnode._tls_private import SOCKET_IO_BYTES
from meshnode.errors import ConnectionClosed, PeerIdMismatch
from meshnode.identity import Identity, PeerAddress
from meshnode.wire.endpoint import Endpoint
from meshnode.wire.message import Message

TIMEOUT = 10.0


def reactor():
    from twisted.internet import reactor

    return reactor


def within(deferred: Deferred) -> Deferred:
    return deferred.addTimeout(TIMEOUT, reactor())


@implementer(IHandshakeListener)
class RecordingPeer(Protocol):
    """A bare TLS client: records the handshake, what it reads and when it is dropped."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        # A request frame: a server that accepted us would answer it.
        self.transport.write(b"\x00\x00\x00\x01\x00\x00\x00\x00\xa0")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


def connect_raw(address: PeerAddress, options) -> RecordingPeer:
    peer = RecordingPeer()
    factory = ClientFactory.forProtocol(lambda: peer)
    reactor().connectTCP(address.host, address.port, TLSMemoryBIOFactory(options, True, factory))
    return peer


async def started(*handlers: dict) -> list[Endpoint]:
    endpoints = [Endpoint(reactor(), Identity.ephemeral(), h) for h in handlers]
    for endpoint in endpoints:
        await within(endpoint.listen("127.0.0.1"))
    return endpoints


async def close_all(*endpoints: Endpoint) -> None:
    await within(gatherResults([e.close() for e in endpoints]))


@pytest_twisted.ensureDeferred
async def test_peer_without_certificate_is_refused():
    """When a TLS client presents no certificate, then the server drops it and answers nothing."""
    (server,) = await started({})
    try:
        peer = connect_raw(server.address, CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_3))
        await within(peer.lost)
        assert peer.received == b""
        assert server.connection_stats() == {}
    finally:
        await close_all(server)


@pytest_twisted.ensureDeferred
async def test_peer_with_another_id_is_refused():
    """When the address pins an id the server does not have, then PeerIdMismatch and no message."""
    seen = []
    (server,) = await started({"echo": lambda peer, m: seen.append(m) or m})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    pinned = server.address.with_node_id(Identity.ephemeral().node_id)
    try:
        with pytest.raises(PeerIdMismatch):
            await within(client.request(pinned, Message("echo"), timeout=TIMEOUT))
        assert seen == [] and client.connection_stats() == {}
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_both_sides_see_each_others_node_id():
    """When a client requests, then each side knows the other's verified node id."""
    seen = []
    (server,) = await started({"who": lambda peer, m: seen.append(peer) or Message("who")})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        await within(client.request(server.address, Message("who"), timeout=TIMEOUT))
        assert seen[0].node_id == client.identity.node_id
        assert list(client.connection_stats()) == [server.identity.node_id]
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_both_ends_send_without_nagle_delay():
    """When a connection is up, then both sockets have TCP_NODELAY: a multi-segment
    tensor frame must not wait for a delayed ACK before its last segment goes out."""
    (server,) = await started({"who": lambda peer, m: Message("who")})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        await within(client.request(server.address, Message("who"), timeout=TIMEOUT))
        for endpoint in (client, server):
            (protocol,) = endpoint._protocols
            sock = protocol.transport.transport.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_round_trip_with_tensors_and_concurrent_requests():
    """When many tensor requests are in flight on one connection, then each gets its own answer."""

    def double(peer, message):
        return Message("double", {"i": message.fields["i"]}, (message.tensors[0] * 2,))

    (server,) = await started({"double": double})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        calls = [
            client.request(
                server.address,
                Message("double", {"i": i}, (np.full((64, 64), i, np.float32),)),
                timeout=TIMEOUT,
            )
            for i in range(16)
        ]
        replies = await within(gatherResults(calls))
        for i, reply in enumerate(replies):
            assert reply.fields["i"] == i
            np.testing.assert_array_equal(reply.tensors[0], np.full((64, 64), 2 * i, np.float32))
        assert len(server._protocols) == 1
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_megabytes_of_tensors_both_ways_arrive_intact():
    """When many MiB of distinct tensors of odd sizes cross one connection both ways at once,
    then every byte arrives in order (direct socket sends, Twisted's buffer and records
    decrypted in place all take part)."""
    rng = np.random.default_rng(7)
    tensors = [rng.integers(0, 256, 1_000_003 + 4099 * i, dtype=np.uint8) for i in range(24)]

    def echo(peer, message):
        return Message("echo", {"i": message.fields["i"]}, message.tensors)

    server, client = await started({"echo": echo}, {"echo": echo})
    try:
        calls = [
            endpoint.request(peer.address, Message("echo", {"i": i}, (tensors[i],)), TIMEOUT)
            for i in range(len(tensors))
            for endpoint, peer in ((client, server), (server, client))
        ]
        replies = await within(gatherResults(calls))
        for n, reply in enumerate(replies):
            np.testing.assert_array_equal(reply.tensors[0], tensors[reply.fields["i"]])
            assert reply.fields["i"] == n // 2
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_holds_the_sender_to_about_one_buffer():
    """When the peer stops reading, then the sender is paused with its frames still queued
    as views (at most about one socket buffer of ciphertext in Twisted's hands), and once
    the peer reads again every frame arrives."""
    tensor = np.arange(8 << 20, dtype=np.uint32).view(np.uint8)  # 32 MiB

    def size(peer, message):
        return Message("n", {"n": sum(t.nbytes for t in message.tensors)})

    (server,) = await started({"n": size})
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        await within(client.request(server.address, Message("n"), timeout=TIMEOUT))
        (server_side,) = server._protocols
        server_side.transport.pauseProducing()
        calls = [
            client.request(server.address, Message("n", {}, (tensor,)), timeout=TIMEOUT)
            for _ in range(2)
        ]
        sender = client._by_node[server.identity.node_id]
        for _ in range(int(TIMEOUT / 0.01)):  # no event says "paused": look each turn
            if sender._paused:
                break
            await task.deferLater(reactor(), 0.01)
        assert sender._paused
        tcp = sender.transport.transport
        assert len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen <= 2 * SOCKET_IO_BYTES
        assert sender.queued_bytes > tensor.nbytes
        server_side.transport.resumeProducing()
        replies = await within(gatherResults(calls))
        assert [reply.fields["n"] for reply in replies] == [tensor.nbytes] * 2
    finally:
        await close_all(server, client)


@pytest_twisted.ensureDeferred
async def test_dial_refused_fails_with_connection_closed():
    """When nothing listens at the address, then ConnectionClosed."""
    (server,) = await started({})
    address = server.address
    await close_all(server)
    client = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        with pytest.raises(ConnectionClosed):
            await within(client.request(address, Message("x"), timeout=TIMEOUT))
    finally:
        await close_all(client)
