"""Every override of a private Twisted or pyOpenSSL name that meshnode's TLS needs.

Two pieces, re-exported by ``meshnode.tls`` (the public facade):

- ``MeshCertificateOptions``: overrides ``CertificateOptions._makeContext`` to
  require a peer certificate while accepting self-signed ones (trust is in
  the node id, checked after the handshake) and to turn partial writes off.
- ``MeshTLSProtocol``: the transport's fast path for tensor frames, below.

Why this exists: Twisted's ``TLSMemoryBIOProtocol`` does Python work per
16 KiB TLS record (one pyOpenSSL ``send`` per record, a new ``bytes`` per
record received, a join of every ``writeSequence``), and pyOpenSSL's
``recv_into`` decrypts into a temporary buffer and copies it. At hundreds of
MB/s that Python work, not the cipher, is the cost. ``MeshTLSProtocol``
differs from Twisted's protocol in three places:

- ``writeSequence``: parts of ``DIRECT_WRITE_BYTES`` or more are never joined;
  each ``SSL_WRITE_BYTES`` slice of the caller's memoryview goes to one
  ``SSL_write`` (partial-write mode is off, see ``MeshCertificateOptions``), and the
  ciphertext is drained from the memory BIO in ``BIO_DRAIN_BYTES`` reads.
- ``_flushReceiveBIO``: when the wrapped protocol has ``get_buffer`` /
  ``buffer_updated`` (asyncio's ``BufferedProtocol`` shape), plaintext is
  decrypted by ``SSL_read`` straight into the buffer it returns (the frame's
  own body buffer), as many records as are available per call, with no
  temporary copy (``read_records``).
- ``makeConnection``: 1 MiB socket reads and sends instead of 64/128 KiB.

Every other path (handshake, small writes, anything while Twisted holds
buffered application data, errors, shutdown) is Twisted's own.

Private names relied on (``PRIVATE_NAMES``; ``tests/wire/test_tls_private.py``
fails loudly when one vanishes), checked against Twisted 26.10.0, pyOpenSSL
26.4.0 and cryptography 50.0.2:

- ``twisted.protocols.tls.TLSMemoryBIOProtocol``: ``_tlsConnection``,
  ``_lostTLSConnection``, ``_handshakeDone``, ``_appSendBuffer``,
  ``_producer``, ``_aborted`` (attributes); ``_flushReceiveBIO`` (overridden),
  ``_flushSendBIO``, ``_bufferedWrite``, ``_shutdownTLS``,
  ``_tlsShutdownFinished`` (called).
- ``twisted.internet.tcp.Connection``: ``SEND_LIMIT``, ``bufferSize``.
- ``OpenSSL.SSL.Connection._ssl`` (the ``SSL*``), used with the ``SSL_read``
  of ``cryptography``'s OpenSSL binding.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from meshnode.identity import Identity

# Twisted coalesces small writes into one TLS record per reactor turn; writes
# at least this large go straight to OpenSSL as memoryviews.
DIRECT_WRITE_BYTES = 16 * 1024
# Plaintext per SSL_write, and ciphertext per BIO read: large enough that the
# Python calls are few, small enough that the BIO's buffer stays in cache.
SSL_WRITE_BYTES = 256 * 1024
BIO_DRAIN_BYTES = 512 * 1024
# Drain buffer of a connection that has only sent small frames so far (DHT
# calls, pings): most connections never need the large one.
SMALL_DRAIN_BYTES = 64 * 1024
SOCKET_IO_BYTES = 1024 * 1024
# Most plaintext asked of OpenSSL per get_buffer (records are 16 KiB at most;
# read_records loops over as many as the BIO holds).
RECV_INTO_BYTES = 4 * 1024 * 1024

# Bytes written straight to the socket before the next chunk goes through
# Twisted's buffer, which makes us wait for the reactor's next write turn: a
# long stream of frames cannot keep the reactor from its other work.
DIRECT_SEND_BUDGET = 4 * 1024 * 1024

_ffi = Binding.ffi
_SSL_read = Binding.lib.SSL_read
_BIO_read = Binding.lib.BIO_read

PRIVATE_NAMES: dict[object, tuple[str, ...]] = {
    CertificateOptions: ("_makeContext",),
    TLSMemoryBIOProtocol: (
        "_flushReceiveBIO",
        "_flushSendBIO",
        "_bufferedWrite",
        "_shutdownTLS",
        "_tlsShutdownFinished",
    ),
    tcp.Connection: ("SEND_LIMIT", "bufferSize"),
}
# Set on each instance (by __init__ or makeConnection), so checked on a live one.
PRIVATE_INSTANCE_NAMES: dict[type, tuple[str, ...]] = {
    TLSMemoryBIOProtocol: (
        "_tlsConnection",
        "_lostTLSConnection",
        "_handshakeDone",
        "_appSendBuffer",
        "_producer",
        "_aborted",
    ),
    tcp.Connection: ("socket", "dataBuffer", "offset", "_tempDataLen", "connected"),
    SSL.Connection: ("_ssl", "_from_ssl"),
}


# OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (pyOpenSSL sets it on every context and
# exports no name for it). With it, SSL_write returns after one 16 KiB record, so
# a large write costs one Python call per record; without it one call encrypts
# the whole slice. Our BIO is a memory BIO, which never refuses a write, so
# SSL_write still never blocks.
_SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1

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
        ctx.clear_mode(_SSL_MODE_ENABLE_PARTIAL_WRITE)
        return ctx


def read_records(connection: SSL.Connection, buffer: memoryview) -> int:
    """Decrypt as many records as are available into ``buffer``; the byte count.

    Raises what ``Connection.recv_into`` raises (``WantReadError`` when no
    record is complete, ``ZeroReturnError``, ``Error``) when nothing was read:
    a failed ``SSL_read`` is repeated through pyOpenSSL, which turns OpenSSL's
    error state into the matching exception.
    """
    size = len(buffer)
    filled = 0
    with _ffi.from_buffer(buffer, require_writable=True) as start:
        while filled < size:
            received = _SSL_read(connection._ssl, start + filled, size - filled)
            if received <= 0:
                break
            filled += received
    if filled:
        return filled
    return connection.recv_into(buffer)


class _DrainBuffer:
    """A reused buffer for ciphertext read from the memory BIO, and its C pointer."""

    def __init__(self, size: int) -> None:
        self._storage = bytearray(size)
        self.view = memoryview(self._storage)
        self.pointer = _ffi.from_buffer(self._storage)


class MeshTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol with the fast paths for tensor frames (module docstring)."""

    _drain: _DrainBuffer | None = None
    _socket: socket.socket | None = None
    _direct_budget = DIRECT_SEND_BUDGET

    def makeConnection(self, transport: object) -> None:
        if isinstance(transport, tcp.Connection):
            # Fewer system calls and reactor turns per tensor frame.
            transport.SEND_LIMIT = SOCKET_IO_BYTES
            transport.bufferSize = SOCKET_IO_BYTES
            # A prompt's hidden states span several segments; with Nagle's algorithm
            # and delayed ACKs each hop stalled 40-90 ms waiting for the last one.
            transport.setTcpNoDelay(True)
            self._socket = transport.socket
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
        sent = 0
        while sent < len(view):
            try:
                sent += self._tlsConnection.send(view[sent : sent + SSL_WRITE_BYTES])
            except SSL.WantReadError:
                # TLS 1.3 over memory BIOs does not get here once the handshake is
                # done; should it, Twisted buffers the rest and retries it.
                self._drain_send_bio(BIO_DRAIN_BYTES)
                self._bufferedWrite(view[sent:])
                return
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
            self._drain_send_bio(BIO_DRAIN_BYTES)

    def _flushSendBIO(self) -> None:
        self._drain_send_bio(SMALL_DRAIN_BYTES)

    def _drain_send_bio(self, size_hint: int) -> None:
        # Ciphertext is read into one reused buffer and, while Twisted holds
        # nothing unsent, written to the socket at once: no bytes object and
        # no join per chunk, and no wait for the reactor's next write turn.
        # What the socket does not take is copied into Twisted's buffer, and
        # everything after it follows there, so the byte order is kept.
        if self._drain is None or len(self._drain.view) < size_hint:
            self._drain = _DrainBuffer(size_hint)
        drain = self._drain
        bio = self._tlsConnection._from_ssl
        direct = self._may_send_directly()
        while True:
            size = _BIO_read(bio, drain.pointer, len(drain.view))
            if size <= 0:
                return
            chunk = drain.view[:size]
            if direct:
                sent = self._send_directly(chunk)
                if sent == size:
                    continue
                chunk, direct = chunk[sent:], False
            self.transport.write(bytes(chunk))

    def _may_send_directly(self) -> bool:
        transport = self.transport
        if self._socket is None or self._direct_budget <= 0:
            self._direct_budget = DIRECT_SEND_BUDGET
            return False
        return (
            transport.connected
            and not self._aborted
            and not transport.disconnecting
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
        )

    def _send_directly(self, chunk: memoryview) -> int:
        try:
            sent = self._socket.send(chunk)
        except OSError:
            # Would block, or a real error that Twisted's own write will meet and report.
            return 0
        self._direct_budget -= sent
        return sent

    def _flushReceiveBIO(self) -> None:
        protocol = self.wrappedProtocol
        if not hasattr(protocol, "get_buffer"):
            super()._flushReceiveBIO()
            return
        while not self._lostTLSConnection:
            buffer = protocol.get_buffer(RECV_INTO_BYTES)
            try:
                received = read_records(self._tlsConnection, buffer)
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
