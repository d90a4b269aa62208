"""Forwarding capabilities: the owner's permission for one worker to push into a session.

When a step is forwarded worker to worker (``infer.push``), the receiving
worker runs it on a session the sender does not own. It does so only with a
capability that the session's owner (the client that opened it) issued:

    capability = {key: owner's raw Ed25519 public key (32 bytes),
                  sig: Ed25519 signature by that key over
                       DOMAIN || receiver node id || session id || sender node id || start}

The receiver checks that the key hashes to the session's owner (node id =
SHA-256 of the key's SubjectPublicKeyInfo, as for every node), that the
signature verifies, and that the tuple is its own node id, that session, the
TLS-verified node id of the peer pushing, and the session's current position.
So a capability is unforgeable without the owner's private key, good for one
receiver, one session, one sender and one position only (a step taken, it is
spent: positions only move forward), and a third party that learns a session
id (or overhears nothing at all: capabilities travel only inside TLS, from the
client to the workers of its route, never in the DHT or any record) cannot
push. Pure: no network, no clock.
"""

from __future__ import annotations

from typing import Any

from meshnode.errors import BadCapability, IdentityError
from meshnode.identity import NodeID, node_id_of, verify_signature

DOMAIN = b"meshnode/forward-capability/v1\x00"
KEY_BYTES = 32
SIGNATURE_BYTES = 64


def signed_bytes(receiver: NodeID, session_id: bytes, sender: NodeID, start: int) -> bytes:
    """The exact bytes a capability signs (domain separated, fixed widths)."""
    return DOMAIN + receiver + session_id + sender + start.to_bytes(8, "big")


def issue(identity: Any, receiver: NodeID, session_id: bytes, sender: NodeID,
          start: int) -> dict[str, bytes]:
    """The capability letting ``sender`` push the step at ``start`` into ``receiver``'s
    session ``session_id``; ``identity`` is the session owner's (it signs)."""
    signature = identity.sign(signed_bytes(receiver, session_id, sender, start))
    return {"key": identity.public_key_raw, "sig": signature}


def signer(capability: Any) -> NodeID:
    """The node id whose key a well-formed ``capability`` names (``BadCapability`` on junk);
    the receiver looks the session up under that owner, then ``check``s the signature."""
    if not isinstance(capability, dict):
        raise BadCapability("a forwarded step needs the session owner's capability")
    key, signature = capability.get("key"), capability.get("sig")
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise BadCapability(f"capability key must be {KEY_BYTES} bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise BadCapability(f"capability signature must be {SIGNATURE_BYTES} bytes")
    try:
        return node_id_of(key)
    except IdentityError as exc:
        raise BadCapability(f"capability key: {exc}") from None


def check(capability: Any, receiver: NodeID, session_id: bytes, sender: NodeID,
          start: int, owner: NodeID) -> None:
    """Raise ``BadCapability`` unless ``capability`` is ``owner``'s for exactly this push."""
    if signer(capability) != owner:
        raise BadCapability("capability not issued by the session's owner")
    data = signed_bytes(receiver, session_id, sender, start)
    if not verify_signature(capability["key"], capability["sig"], data):
        raise BadCapability(
            "capability does not cover this push (another session, receiver, sender or "
            "position, or forged)")
