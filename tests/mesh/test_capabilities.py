"""Forwarding capabilities: only the session's owner can let a sender push, once, there."""

from __future__ import annotations

import pytest

from meshnode.errors import BadCapability
from meshnode.inference import capabilities
from meshnode.inference.capabilities import PushKeys

OWNER, THIEF = b"O" * 32, b"T" * 32
SENDER, OTHER = b"s" * 32, b"o" * 32
SESSION, OTHER_SESSION = bytes(16), bytes(range(16))


@pytest.fixture
def worker() -> PushKeys:
    return PushKeys()


def issued(worker: PushKeys, owner=OWNER, session=SESSION, sender=SENDER, start=12):
    """What ``owner`` makes with the push key the worker gave it for ``session``."""
    return capabilities.issue(owner, worker.for_session(owner, session), sender, start)


def test_the_owners_capability_for_this_push_passes(worker):
    """When the owner made a capability with its session's push key for this sender and
    position, then the worker's check passes and names the owner."""
    assert worker.check(issued(worker), SESSION, SENDER, 12) == OWNER


@pytest.mark.parametrize("session, sender, start", [
    (OTHER_SESSION, SENDER, 12),   # another session's capability
    (SESSION, OTHER, 12),          # pushed by another peer than the one allowed
    (SESSION, SENDER, 13),         # spent: the session moved on
])
def test_a_capability_covers_exactly_one_push(worker, session, sender, start):
    """When a capability is presented for another session, sender or position, then it is
    refused."""
    with pytest.raises(BadCapability):
        worker.check(issued(worker), session, sender, start)


def test_push_keys_are_per_worker_owner_and_session(worker):
    """When the same owner and session id are named to another worker, or another owner
    names the session, then the push keys differ: none can stand for another."""
    keys = {worker.for_session(OWNER, SESSION), PushKeys().for_session(OWNER, SESSION),
            worker.for_session(THIEF, SESSION), worker.for_session(OWNER, OTHER_SESSION)}
    assert len(keys) == 4


def test_a_capability_from_another_workers_key_is_refused(worker):
    """When the owner's capability was made with another worker's push key for the same
    session id, then this worker refuses it."""
    elsewhere = capabilities.issue(OWNER, PushKeys().for_session(OWNER, SESSION), SENDER, 12)
    with pytest.raises(BadCapability):
        worker.check(elsewhere, SESSION, SENDER, 12)


def test_a_third_party_cannot_make_one(worker):
    """When a third party names the owner with a key of its own, or its own push key (from
    a session it opened itself), then the capability is refused."""
    guessed = capabilities.issue(OWNER, bytes(32), SENDER, 12)
    own = {"owner": OWNER, "tag": issued(worker, owner=THIEF)["tag"]}
    for capability in (guessed, own):
        with pytest.raises(BadCapability, match="forged"):
            worker.check(capability, SESSION, SENDER, 12)


@pytest.mark.parametrize("junk", [None, {}, {"owner": b"o", "tag": bytes(32)},
                                  {"owner": OWNER, "tag": b"short"}, "cap"])
def test_a_missing_or_malformed_capability_is_refused(worker, junk):
    """When a push carries no capability, or a malformed one, then it is refused."""
    with pytest.raises(BadCapability):
        worker.check(junk, SESSION, SENDER, 12)
