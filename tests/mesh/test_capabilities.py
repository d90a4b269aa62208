"""Forwarding capabilities: only the session's owner can let a sender push, once, there."""

from __future__ import annotations

import pytest

from meshnode.errors import BadCapability
from meshnode.identity import Identity
from meshnode.inference import capabilities

OWNER, THIEF = Identity.ephemeral(), Identity.ephemeral()
RECEIVER, SENDER, OTHER = b"r" * 32, b"s" * 32, b"o" * 32
SESSION, OTHER_SESSION = bytes(16), bytes(range(16))


def issued(**changes):
    args = {"identity": OWNER, "receiver": RECEIVER, "session_id": SESSION,
            "sender": SENDER, "start": 12, **changes}
    return capabilities.issue(**args)


def check(capability, **changes):
    args = {"receiver": RECEIVER, "session_id": SESSION, "sender": SENDER, "start": 12,
            "owner": OWNER.node_id, **changes}
    capabilities.check(capability, **args)


def test_the_owners_capability_for_this_push_passes():
    """When the owner issued a capability for this receiver, session, sender and position,
    then the check passes and names the owner as signer."""
    capability = issued()
    check(capability)
    assert capabilities.signer(capability) == OWNER.node_id


@pytest.mark.parametrize("change", [
    {"session_id": OTHER_SESSION},   # another session's capability
    {"receiver": OTHER},             # issued for another worker
    {"sender": OTHER},               # pushed by another peer than the one allowed
    {"start": 13},                   # spent: the session moved on
])
def test_a_capability_covers_exactly_one_push(change):
    """When a capability is presented for another session, receiver, sender or position,
    then it is refused."""
    with pytest.raises(BadCapability):
        check(issued(), **change)


def test_a_capability_signed_by_anyone_else_is_refused():
    """When a third party signs a capability with its own key for the owner's session,
    then it is refused: its key is not the owner's."""
    with pytest.raises(BadCapability, match="owner"):
        check(issued(identity=THIEF))


def test_a_forged_signature_under_the_owners_key_is_refused():
    """When the owner's public key comes with a signature it did not make, then refused."""
    forged = {"key": OWNER.public_key_raw, "sig": THIEF.sign(b"anything").ljust(64, b"\0")}
    with pytest.raises(BadCapability, match="forged"):
        check(forged)


@pytest.mark.parametrize("junk", [None, {}, {"key": b"k", "sig": bytes(64)},
                                  {"key": bytes(32), "sig": b"short"}, "cap"])
def test_a_missing_or_malformed_capability_is_refused(junk):
    """When a push carries no capability, or a malformed one, then it is refused."""
    with pytest.raises(BadCapability):
        check(junk)
