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

``MeshTLSProtocol`` is Twisted's ``TLSMemoryBIOProtocol`` with fast paths
for tensor frames: a ``writeSequence`` that hands each large memoryview to
OpenSSL in place (Twisted's joins the sequence into a new ``bytes``), and
records decrypted straight into the wrapped protocol's frame buffer. It
relies on private Twisted and pyOpenSSL names, so it lives apart, in
``meshnode.wire._tls_fastpath``, whose docstring lists them.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory

from meshnode.errors import IdentityError, PeerIdMismatch
from meshnode.identity import Identity, NodeID, format_node_id, node_id_of_certificate
from meshnode.wire._tls_fastpath import MeshTLSProtocol

__all__ = [
    "MeshCertificateOptions",
    "MeshTLSFactory",
    "MeshTLSProtocol",
    "check_pinned",
    "peer_node_id",
    "tls_factory",
]

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
