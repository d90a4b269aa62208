"""Mutual TLS 1.3 between nodes, bound to node ids.

Usage::

    factory = tls_factory(identity, wrapped_factory, is_client=False, clock=reactor)
    reactor.listenTCP(port, factory)                      # server side
    reactor.connectTCP(host, port, tls_factory(identity, f, is_client=True, clock=reactor))

Both sides present their self-signed certificate (``meshnode.identity``) and
both require one from the peer: a peer without a certificate fails the
handshake. Self-signed certificates are accepted by the verify callback
because trust is not in a CA but in the node id: once the handshake
completes, the wrapped protocol (an ``IHandshakeListener``) calls
``peer_node_id(transport)`` and compares it with the id it dialled, if the
address pinned one (``check_pinned``), dropping the connection with
``PeerIdMismatch`` before any message is read.

``MeshTLSProtocol`` is Twisted's ``TLSMemoryBIOProtocol`` with a
``writeSequence`` that hands each memoryview to OpenSSL in place, instead of
joining the sequence into a new ``bytes`` (Twisted's default): tensor bodies
are never copied on the send path before encryption.
"""

from __future__ import annotations

from collections.abc import Iterable

from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from meshnode.errors import IdentityError, PeerIdMismatch
from meshnode.identity import Identity, NodeID, format_node_id, node_id_of_certificate

# Twisted coalesces small writes into one TLS record per reactor turn; writes
# at least this large go straight to OpenSSL as memoryviews.
DIRECT_WRITE_BYTES = 16 * 1024

# Plaintext handed to OpenSSL per SSL_write for large parts, and ciphertext read
# back per BIO read: large enough that Python overhead per byte is negligible.
SSL_WRITE_BYTES = 256 * 1024
BIO_DRAIN_BYTES = 512 * 1024
SOCKET_IO_BYTES = 1024 * 1024
# Most plaintext asked of OpenSSL per read (one record is at most 16 KiB).
RECV_INTO_BYTES = 64 * 1024

_VERIFY_FLAGS = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE


def _accept_any_certificate(
    connection: SSL.Connection, certificate: object, errno: int, depth: int, ok: int
) -> bool:
    # Self-signed certificates fail chain verification by design: the peer is
    # authenticated by its node id after the handshake, not by a CA.
    return True


class MeshCertificateOptions(CertificateOptions):
    """TLS 1.3 only, our certificate presented, a peer certificate required but self-signed."""

    def __init__(self, identity: Identity) -> None:
        super().__init__(
            privateKey=identity.private_key,
            certificate=identity.certificate,
            raiseMinimumTo=TLSVersion.TLSv1_3,
        )

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        ctx = super()._makeContext(skipCiphers)
        ctx.set_verify(_VERIFY_FLAGS, _accept_any_certificate)
        return ctx


def peer_node_id(transport: object) -> NodeID:
    """The node id of the peer behind a TLS transport whose handshake has completed."""
    certificate = transport.getHandle().get_peer_certificate(as_cryptography=True)
    if certificate is None:
        raise IdentityError("peer presented no certificate")
    return node_id_of_certificate(certificate)


def check_pinned(expected: NodeID | None, actual: NodeID) -> None:
    """Raise ``PeerIdMismatch`` when a pinned id is not the one the peer presented."""
    if expected is not None and expected != actual:
        raise PeerIdMismatch(
            f"dialled {format_node_id(expected)}, peer is {format_node_id(actual)}"
        )


class MeshTLSProtocol(TLSMemoryBIOProtocol):
    """TLS transport tuned for large tensor frames.

    ``writeSequence`` never joins large parts into new bytes (Twisted's joins
    everything), and large parts bypass Twisted's per-16-KiB-record loop: each
    ``SSL_WRITE_BYTES`` slice of the caller's memoryview goes to OpenSSL in one
    call (which cuts it into records), and the encrypted bytes are drained from
    the memory BIO in ``BIO_DRAIN_BYTES`` reads. Small parts, and anything
    written before the handshake completes or while Twisted still holds
    buffered application data, take Twisted's own path, so ordering is kept.
    """

    def makeConnection(self, transport: object) -> None:
        # Bigger socket reads and sends than Twisted's defaults (64 KiB / 128 KiB):
        # fewer system calls and reactor turns per tensor frame.
        if hasattr(transport, "SEND_LIMIT"):
            transport.SEND_LIMIT = SOCKET_IO_BYTES
            transport.bufferSize = SOCKET_IO_BYTES
        super().makeConnection(transport)

    def writeSequence(self, iovec: Iterable[bytes | memoryview]) -> None:
        small: list[bytes | memoryview] = []
        for part in iovec:
            if len(part) < DIRECT_WRITE_BYTES:
                small.append(part)
                continue
            if small:
                self.write(b"".join(small))
                small = []
            self._write_large(part)
        if small:
            self.write(b"".join(small))

    def _write_large(self, data: bytes | memoryview) -> None:
        if self._lostTLSConnection or (self.disconnecting and self._producer is None):
            return
        if not self._handshakeDone or self._appSendBuffer:
            self.write(data)
            return
        view = memoryview(data)
        sent = unflushed = 0
        while sent < len(view):
            try:
                # pyOpenSSL enables partial writes: each call may take one record only.
                written = self._tlsConnection.send(view[sent : sent + SSL_WRITE_BYTES])
            except SSL.WantReadError:
                # Only a TLS 1.3 key update can get here; let Twisted buffer the rest.
                self._drain_send_bio()
                self._bufferedWrite(view[sent:])
                return
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
            sent += written
            unflushed += written
            if unflushed >= SSL_WRITE_BYTES:
                self._drain_send_bio()
                unflushed = 0
        self._drain_send_bio()

    def _drain_send_bio(self) -> None:
        while True:
            try:
                encrypted = self._tlsConnection.bio_read(BIO_DRAIN_BYTES)
            except SSL.WantReadError:
                return
            self.transport.write(encrypted)


    def _flushReceiveBIO(self) -> None:
        # A wrapped protocol with get_buffer/buffer_updated (asyncio's BufferedProtocol
        # shape) has records decrypted straight into its own buffer: no bytes object
        # per record, no second copy.
        protocol = self.wrappedProtocol
        if not hasattr(protocol, "get_buffer"):
            super()._flushReceiveBIO()
            return
        while not self._lostTLSConnection:
            buffer = protocol.get_buffer(RECV_INTO_BYTES)
            try:
                received = self._tlsConnection.recv_into(buffer, len(buffer))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    protocol.buffer_updated(received)
        self._flushSendBIO()


class MeshTLSFactory(TLSMemoryBIOFactory):
    protocol = MeshTLSProtocol


def tls_factory(
    identity: Identity,
    wrapped_factory: IProtocolFactory,
    is_client: bool,
    clock: IReactorTime,
) -> MeshTLSFactory:
    """Wrap ``wrapped_factory`` in mutual TLS 1.3 with ``identity``'s certificate."""
    return MeshTLSFactory(MeshCertificateOptions(identity), is_client, wrapped_factory, clock)
