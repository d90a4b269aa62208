"""The TLS fast path: the private names it needs still exist; records land whole in one buffer."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from meshnode import _tls_private
from meshnode._tls_private import (
    PRIVATE_INSTANCE_NAMES,
    PRIVATE_NAMES,
    SSL_WRITE_BYTES,
    read_records,
)
from meshnode.identity import Identity
from meshnode.tls import MeshCertificateOptions

UPGRADE_HINT = (
    "meshnode._tls_private relies on this private name (checked against Twisted "
    "26.10.0, pyOpenSSL 26.4.0): re-check the fast path against the new version"
)


def memory_pair() -> tuple[SSL.Connection, SSL.Connection]:
    """A client and a server connection over memory BIOs, handshake done."""
    client = SSL.Connection(MeshCertificateOptions(Identity.ephemeral()).getContext(), None)
    server = SSL.Connection(MeshCertificateOptions(Identity.ephemeral()).getContext(), None)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(4):
        for this, other in ((client, server), (server, client)):
            try:
                this.do_handshake()
            except SSL.WantReadError:
                pass
            pump(this, other)
    return client, server


def pump(source: SSL.Connection, sink: SSL.Connection) -> None:
    while True:
        try:
            sink.bio_write(source.bio_read(1 << 20))
        except SSL.WantReadError:
            return


def instances() -> dict[type, object]:
    wrapped = Factory.forProtocol(Protocol)
    tls = TLSMemoryBIOFactory(
        MeshCertificateOptions(Identity.ephemeral()), False, wrapped
    ).buildProtocol(None)
    tls.makeConnection(StringTransport())
    left, right = socket.socketpair()
    connection = tcp.Connection(left, None)
    right.close()
    return {
        TLSMemoryBIOProtocol: tls,
        tcp.Connection: connection,
        SSL.Connection: tls._tlsConnection,
    }


def test_private_twisted_and_pyopenssl_names_still_exist():
    """When Twisted or pyOpenSSL drop a private name the fast path uses, then this fails."""
    for owner, names in PRIVATE_NAMES.items():
        for name in names:
            assert hasattr(owner, name), f"{owner.__qualname__}.{name}: {UPGRADE_HINT}"
    live = instances()
    for owner, names in PRIVATE_INSTANCE_NAMES.items():
        for name in names:
            assert hasattr(live[owner], name), f"{owner.__qualname__}().{name}: {UPGRADE_HINT}"
    live[tcp.Connection].socket.close()


def test_one_ssl_write_takes_a_whole_slice():
    """When a large slice is sent, then OpenSSL takes all of it in one call (no partial writes)."""
    client, _ = memory_pair()
    assert client.send(bytes(SSL_WRITE_BYTES)) == SSL_WRITE_BYTES


def test_many_records_land_in_one_buffer():
    """When several records are waiting, then one read_records call decrypts them all in place."""
    client, server = memory_pair()
    data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)
    client.send(data.tobytes())
    pump(client, server)
    buffer = np.zeros(200_000, np.uint8)
    assert read_records(server, memoryview(buffer)) == data.size
    np.testing.assert_array_equal(buffer[: data.size], data)


def test_read_records_stops_at_the_end_of_its_buffer():
    """When the buffer is shorter than what waits, then it is filled and the rest stays queued."""
    client, server = memory_pair()
    client.send(b"abcdefghij" * 5000)
    pump(client, server)
    first = bytearray(7)
    assert read_records(server, memoryview(first)) == 7
    rest = bytearray(60_000)
    assert read_records(server, memoryview(rest)) == 49_993
    assert bytes(first + rest[:49_993]) == b"abcdefghij" * 5000


def test_read_records_raises_like_recv_into():
    """When nothing is waiting, then WantReadError; after the peer's close_notify,
    ZeroReturnError."""
    client, server = memory_pair()
    with pytest.raises(SSL.WantReadError):
        read_records(server, memoryview(bytearray(100)))
    client.send(b"last")
    client.shutdown()
    pump(client, server)
    buffer = bytearray(100)
    assert read_records(server, memoryview(buffer)) == 4
    with pytest.raises(SSL.ZeroReturnError):
        read_records(server, memoryview(buffer))


def test_read_records_raises_on_a_corrupt_record():
    """When a record fails authentication, then SSL.Error, not garbage in the buffer."""
    client, server = memory_pair()
    client.send(b"x" * 1000)
    record = bytearray(client.bio_read(1 << 20))
    record[-1] ^= 1
    server.bio_write(bytes(record))
    with pytest.raises(SSL.Error):
        read_records(server, memoryview(bytearray(2000)))


def test_module_keeps_its_limits_sane():
    """The drain buffer holds at least one slice's records; reads ask for at least one record."""
    assert _tls_private.BIO_DRAIN_BYTES >= _tls_private.SSL_WRITE_BYTES
    assert _tls_private.RECV_INTO_BYTES >= 16 * 1024
