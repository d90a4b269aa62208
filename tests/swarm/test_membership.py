"""Membership certificates and the swarm's checks, with a fake clock and no network."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.dht.records import SignedRecord, sign_record
from meshnode.dht.storage import RecordStore
from meshnode.errors import NotAMember, SwarmError
from meshnode.identity import Identity, membership_of_certificate
from meshnode.swarm.keys import create_swarm, load_swarm_key, load_swarm_public_key, swarm_id
from meshnode.swarm.membership import (
    MembershipCertificate,
    issue_membership,
    read_membership,
    write_membership,
)
from meshnode.swarm.policy import join_swarm
from meshnode.swarm.revocation import append_revoked, read_revoked
from tests.swarm.swarm_helpers import DAY, NOW, Swarm


def test_a_member_passes_and_its_certificate_rides_in_its_tls_certificate():
    """When a node holds a certificate signed by the swarm key, then its TLS certificate
    carries it and the policy admits that certificate for that node id."""
    swarm = Swarm()
    member = swarm.member()
    assert membership_of_certificate(member.certificate) == member.membership
    swarm.policy.check_peer(member.certificate, member.node_id)


@pytest.mark.parametrize(
    "case",
    ["no certificate", "another swarm", "another node", "expired", "bad signature", "garbage"],
)
def test_a_peer_that_cannot_prove_membership_is_refused(case):
    """When a peer's certificate is missing, foreign, for another node, expired, forged or
    not a certificate, then NotAMember."""
    swarm = Swarm()
    member = swarm.member(days=1)
    node_id, membership = member.node_id, member.membership
    if case == "no certificate":
        membership = None
    elif case == "another swarm":
        membership = Swarm().member().membership
    elif case == "another node":
        node_id = Identity.ephemeral().node_id
    elif case == "expired":
        swarm.clock.advance(DAY + 1)
    elif case == "bad signature":
        cert = MembershipCertificate.decode(membership)
        forged = dataclasses.replace(cert, expires=cert.expires + 100 * DAY)
        membership = forged.encode()
    else:
        membership = b"\xff\x00not cbor"
    with pytest.raises(NotAMember):
        swarm.policy.check_membership(membership, node_id)


def test_a_public_node_certificate_carries_no_membership():
    """When a node belongs to no swarm, then its TLS certificate has no membership extension."""
    assert membership_of_certificate(Identity.ephemeral().certificate) is None


def test_revoked_member_is_refused_once_the_list_is_reloaded(tmp_path):
    """When a member's id is added to the revocation list, then it passes until the next
    reload (periodic, on the injected clock) and is refused after it."""
    revoked = tmp_path / "revoked"
    swarm = Swarm(revoked)
    member = swarm.member()
    reloads = []
    swarm.policy.on_reload(lambda: reloads.append(1))
    swarm.policy.start()
    append_revoked(revoked, member.node_id, "lost laptop")
    swarm.policy.check_peer(member.certificate, member.node_id)
    swarm.clock.advance(5.0)
    assert reloads == [1]
    with pytest.raises(NotAMember, match="revoked"):
        swarm.policy.check_peer(member.certificate, member.node_id)
    swarm.policy.stop()


def test_revocation_list_ignores_comments_and_refuses_garbage(tmp_path):
    """When the list holds comments and blank lines, then only ids count; a bad line is an error,
    and a reload that meets one keeps the previous list."""
    path = tmp_path / "revoked"
    node = Identity.ephemeral().node_id
    path.write_text(f"# revoked nodes\n\n{node.hex().upper()}  # why\n")
    assert read_revoked(path) == {node}
    swarm = Swarm(path)
    path.write_text("not-an-id\n")
    with pytest.raises(SwarmError, match=":1:"):
        read_revoked(path)
    assert swarm.policy.reload() == {node}


def test_store_keeps_and_returns_only_members_records(tmp_path):
    """When a swarm node's store is offered records, then a member's is kept, an outsider's is
    refused with NotAMember, and a member revoked later is no longer returned."""
    revoked = tmp_path / "revoked"
    swarm = Swarm(revoked)
    store = RecordStore(swarm.clock, admit=swarm.policy.check_record)
    key = bytes(32)
    member, outsider = swarm.member(), Identity.ephemeral()
    record = sign_record(member, key, {"n": 1}, NOW + 60)
    assert record.membership == member.membership
    assert store.put(record)
    with pytest.raises(NotAMember):
        store.put(sign_record(outsider, key, {"n": 2}, NOW + 60))
    stolen = dataclasses.replace(sign_record(outsider, key, {"n": 3}, NOW + 60),
                                 membership=member.membership)
    with pytest.raises(NotAMember, match="another node"):
        store.put(stolen)
    assert list(store.get(key)) == [member.node_id]
    append_revoked(revoked, member.node_id)
    swarm.policy.reload()
    assert store.get(key) == {}


def test_member_records_keep_their_membership_on_the_wire():
    """When a member's record is encoded and parsed again, then its membership survives;
    a public record's encoding has no membership key."""
    swarm = Swarm()
    record = sign_record(swarm.member(), bytes(32), {"n": 1}, NOW + 60)
    assert SignedRecord.from_wire(record.to_wire()) == record
    public = sign_record(Identity.ephemeral(), bytes(32), {"n": 1}, NOW + 60)
    assert "membership" not in public.to_wire()


def test_swarm_files_and_joining(tmp_path):
    """When a swarm is created and a node admitted, then join_swarm gives that node an identity
    carrying its membership; a node never admitted, or expired, cannot join."""
    key = create_swarm(tmp_path / "s")
    assert (tmp_path / "s" / "swarm.key").stat().st_mode & 0o777 == 0o600
    assert swarm_id(load_swarm_public_key(tmp_path / "s" / "swarm.pub")) == swarm_id(
        key.public_key())
    with pytest.raises(SwarmError, match="exists"):
        create_swarm(tmp_path / "s")
    node = Identity.load_or_create(tmp_path / "n")
    certificate = issue_membership(load_swarm_key(tmp_path / "s"), node.node_id, NOW, NOW + DAY)
    write_membership(tmp_path / "n", certificate)
    assert read_membership(tmp_path / "n") == certificate.encode()
    swarm = Swarm()
    joined, policy = join_swarm(tmp_path / "s" / "swarm.pub", node, tmp_path / "n", swarm.clock)
    assert joined.node_id == node.node_id and joined.membership == certificate.encode()
    assert policy.swarm_id == swarm_id(key.public_key())
    with pytest.raises(SwarmError, match="no membership certificate"):
        join_swarm(tmp_path / "s" / "swarm.pub", Identity.ephemeral(), tmp_path / "x",
                   swarm.clock)
    swarm.clock.advance(2 * DAY)
    with pytest.raises(SwarmError, match="expired"):
        join_swarm(tmp_path / "s" / "swarm.pub", node, tmp_path / "n", swarm.clock)
    assert join_swarm(None, node, None, swarm.clock) == (node, None)


def test_issue_refuses_nonsense():
    """When a membership would expire before it is issued, then SwarmError."""
    with pytest.raises(SwarmError):
        issue_membership(Ed25519PrivateKey.generate(), bytes(32), NOW, NOW)
