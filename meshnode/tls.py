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

``MeshCertificateOptions`` (TLS 1.3 only, a peer certificate required but
self-signed) and ``MeshTLSProtocol`` (Twisted's ``TLSMemoryBIOProtocol`` with
fast paths for tensor frames: a ``writeSequence`` that hands each large
memoryview to OpenSSL in place, and records decrypted straight into the
wrapped protocol's frame buffer) override private Twisted and pyOpenSSL names,
so they live apart, in ``meshnode._tls_private``, whose docstring and
``PRIVATE_NAMES`` list every one (as ``twisted.internet.ssl`` over
``_sslverify``). This module only re-exports them.
"""

from __future__ import annotations

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from meshnode._tls_private import MeshCertificateOptions, MeshTLSProtocol
from meshnode.errors import IdentityError, PeerIdMismatch
from meshnode.identity import Identity, NodeID, format_node_id, node_id_of_certificate

__all__ = [
    "MeshCertificateOptions",
    "MeshTLSFactory",
    "MeshTLSProtocol",
    "check_pinned",
    "peer_node_id",
    "tls_factory",
]

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
