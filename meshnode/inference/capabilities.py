"""Forwarding capabilities: the owner's permission for one worker to push into a session.

When a step is forwarded worker to worker (``infer.push``), the receiving
worker runs it on a session the sender does not own. It does so only with a
capability that the session's owner (the client that opened it) issued.

Each worker holds a random secret of its own (``PushKeys``, never sent). When
a client opens a session, the worker answers with that session's **push key**
(in ``infer.open.ok``, inside TLS, to the owner only):

    push_key   = HMAC-SHA256(worker secret, KEY_DOMAIN || owner node id || session id)
    capability = {owner: owner node id,
                  tag: HMAC-SHA256(push_key, TAG_DOMAIN || sender node id || start)}

The owner issues one capability per later hop and step: for that hop's
session, the worker allowed to push (the hop before) and the step's start.
The receiver recomputes the push key from its secret, checks the tag with the
TLS-verified node id of the peer pushing and the session's position, and only
then looks the session up under the owner named. So a capability cannot be
made without the push key, which only the owner and that worker know (it
travels once inside TLS, never in the DHT or any record); it is good for one
receiver, one session, one owner, one sender and one position (a step
taken, it is spent: positions only move forward).

Why not a signature by the owner's key: an Ed25519 verification costs about
0.25-0.7 ms here against 15 us for two HMACs, and each later hop checks one
per token on the chain's critical path. Pure: no network, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from meshnode.errors import BadCapability
from meshnode.identity import NODE_ID_BYTES, NodeID

KEY_DOMAIN = b"meshnode/push-key/v1\x00"
TAG_DOMAIN = b"meshnode/forward-capability/v1\x00"
KEY_BYTES = TAG_BYTES = SECRET_BYTES = 32


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def tagged_bytes(sender: NodeID, start: int) -> bytes:
    """The exact bytes a capability's tag covers (domain separated, fixed widths)."""
    return TAG_DOMAIN + sender + start.to_bytes(8, "big")


def issue(owner: NodeID, push_key: bytes, sender: NodeID, start: int) -> dict[str, bytes]:
    """The capability letting ``sender`` push the step at ``start`` into the session whose
    push key (from its ``infer.open.ok``) is ``push_key``; ``owner`` is the caller's id."""
    return {"owner": owner, "tag": _mac(push_key, tagged_bytes(sender, start))}


class PushKeys:
    """A worker's secret, and the push keys of its sessions derived from it."""

    def __init__(self, secret: bytes | None = None):
        self._secret = secret if secret is not None else os.urandom(SECRET_BYTES)

    def for_session(self, owner: NodeID, session_id: bytes) -> bytes:
        """The push key of ``owner``'s session ``session_id`` (sent to the owner at open)."""
        return _mac(self._secret, KEY_DOMAIN + owner + session_id)

    def check(self, capability: Any, session_id: bytes, sender: NodeID, start: int) -> NodeID:
        """The owner a valid ``capability`` names; ``BadCapability`` unless it is that owner's
        for exactly this push (this session, this sender, this start)."""
        if not isinstance(capability, dict):
            raise BadCapability("a forwarded step needs the session owner's capability")
        owner, tag = capability.get("owner"), capability.get("tag")
        if not isinstance(owner, bytes) or len(owner) != NODE_ID_BYTES:
            raise BadCapability(f"capability owner must be a {NODE_ID_BYTES}-byte node id")
        if not isinstance(tag, bytes) or len(tag) != TAG_BYTES:
            raise BadCapability(f"capability tag must be {TAG_BYTES} bytes")
        expected = _mac(self.for_session(owner, session_id), tagged_bytes(sender, start))
        if not hmac.compare_digest(expected, tag):
            raise BadCapability(
                "capability does not cover this push (another session, owner, sender or "
                "position, or forged)")
        return owner
