"""Node ids, XOR distance and contacts: the vocabulary of the DHT.

Ids are the 256-bit node ids of the identity layer (SHA-256 of a node's
Ed25519 public key), so a DHT id is proven by the TLS handshake and cannot be
chosen freely. Keys live in the same space: a block's key is the SHA-256 of a
canonical encoding of (model fingerprint, block index).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cbor2

from meshnode.identity import NODE_ID_BYTES, NodeID, PeerAddress, format_node_id

ID_BITS = NODE_ID_BYTES * 8
BLOCK_KEY_DOMAIN = "meshnode.block.v1"


def id_to_int(node_id: bytes) -> int:
    """An id (or key) as a big-endian integer in [0, 2**256)."""
    return int.from_bytes(node_id, "big")


def int_to_id(value: int) -> NodeID:
    """The inverse of ``id_to_int``."""
    return value.to_bytes(NODE_ID_BYTES, "big")


def distance(a: bytes, b: bytes) -> int:
    """The Kademlia XOR metric between two ids."""
    return id_to_int(a) ^ id_to_int(b)


def block_key(model_fingerprint: str, block_index: int) -> bytes:
    """The 32-byte DHT key under which the servers of one model block are announced."""
    payload = cbor2.dumps([BLOCK_KEY_DOMAIN, model_fingerprint, int(block_index)], canonical=True)
    return hashlib.sha256(payload).digest()


@dataclass(frozen=True)
class Contact:
    """A DHT peer: its node id and the address it listens on."""

    node_id: NodeID
    host: str
    port: int

    @property
    def address(self) -> PeerAddress:
        """The address pinned to the node id, so TLS refuses an impostor."""
        return PeerAddress(self.host, self.port, self.node_id)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}#{format_node_id(self.node_id)[:12]}"
