"""Membership at connection set-up: in memory (fake transport, fake clock), then on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.testing import StringTransport

from meshnode.dht.network import DHTNode
from meshnode.errors import DHTError, NotAMember, RemoteError
from meshnode.identity import Identity
from meshnode.swarm.revocation import append_revoked
from meshnode.wire.endpoint import Endpoint
from meshnode.wire.frames import FrameDecoder
from meshnode.wire.header import decode_cbor
from meshnode.wire.limits import WireLimits
from meshnode.wire.message import Message
from meshnode.wire.protocol import MeshProtocol
from tests.swarm.swarm_helpers import Swarm

TIMEOUT = 10.0


class _Handle:
    def __init__(self, certificate) -> None:
        self.certificate = certificate

    def get_peer_certificate(self, as_cryptography: bool = False):
        return self.certificate


class TLSLikeTransport(StringTransport):
    """A StringTransport whose peer certificate is ``certificate`` (as after a TLS handshake)."""

    def __init__(self, certificate) -> None:
        super().__init__()
        self.handle = _Handle(certificate)
        self.aborted = False

    def getHandle(self):
        return self.handle

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def handshake(swarm: Swarm, peer: Identity, handlers=None):
    """A swarm member's protocol after a completed handshake with ``peer``."""
    seen = []
    handlers = handlers if handlers is not None else {"echo": lambda p, m: seen.append(m) or m}
    protocol = MeshProtocol(swarm.clock, WireLimits(), handlers.get, None,
                            swarm.policy.check_peer)
    transport = TLSLikeTransport(peer.certificate)
    protocol.makeConnection(transport)
    protocol.handshakeCompleted()
    return protocol, transport, seen


def frames_written(transport: StringTransport) -> list[dict]:
    return [decode_cbor(f.header) for f in FrameDecoder(1 << 20, 1 << 20).feed(transport.value())]


def request_bytes() -> bytes:
    from meshnode.wire.codec import encode_message

    return b"".join(bytes(p) for p in encode_message("request", 1, Message("echo", {"n": 1})))


def test_outsider_is_told_why_and_nothing_it_sends_is_handled():
    """When a peer without membership completes the handshake, then one connection-level
    error frame ``not_a_member`` goes out, the connection closes, ``ready`` fails with
    NotAMember and a request it sent is never handled."""
    swarm = Swarm()
    protocol, transport, seen = handshake(swarm, Identity.ephemeral())
    failures = []
    protocol.ready.addErrback(failures.append)
    protocol.dataReceived(request_bytes())
    (error,) = frames_written(transport)
    assert error["kind"] == "error" and error["id"] == 0
    assert error["fields"]["code"] == "not_a_member"
    assert "private swarm" in error["fields"]["message"]
    assert transport.disconnecting and seen == []
    protocol.connectionLost(None)
    assert failures and failures[0].check(NotAMember)


def test_member_is_bound_and_served():
    """When a peer proves membership at the handshake, then its requests are handled."""
    swarm = Swarm()
    member = swarm.member()
    protocol, transport, seen = handshake(swarm, member)
    assert protocol.peer.node_id == member.node_id
    protocol.dataReceived(request_bytes())
    swarm.clock.advance(0)  # the turn ends: its frames leave
    assert len(seen) == 1 and frames_written(transport)[0]["kind"] == "response"


def test_refused_side_fails_its_requests_with_the_peers_reason():
    """When the peer answers our connection with a connection-level error and closes, then
    our pending request fails with that RemoteError (not a bare ConnectionClosed)."""
    swarm = Swarm()
    public = MeshProtocol(swarm.clock, WireLimits(), {}.get)  # an outsider: no check
    transport = TLSLikeTransport(swarm.member().certificate)
    public.makeConnection(transport)
    public.handshakeCompleted()
    pending = public.request(Message("echo"), 5.0)
    failures = []
    pending.addErrback(failures.append)
    from meshnode.wire.codec import encode_error

    public.dataReceived(b"".join(bytes(p) for p in encode_error(0, "", "not_a_member", "go")))
    public.connectionLost(None)
    assert failures[0].check(RemoteError) and failures[0].value.code == "not_a_member"


# --- on loopback, real TLS ------------------------------------------------------


def reactor():
    from twisted.internet import reactor

    return reactor


def within(deferred: Deferred) -> Deferred:
    return deferred.addTimeout(TIMEOUT, reactor())


@pytest_twisted.ensureDeferred
async def test_on_loopback_members_talk_and_outsiders_are_refused_both_ways(tmp_path):
    """When members and an outsider dial each other over real TLS, then members are answered,
    an outsider dialling a member gets ``not_a_member``, a member dialling an outsider
    refuses it, and a member revoked at a reload is dropped and refused after."""
    revoked = tmp_path / "revoked"
    swarm = Swarm(revoked)
    swarm.policy.clock = reactor()  # real time for real sockets; certificates last a day
    from meshnode.swarm.membership import issue_membership

    def member() -> Identity:
        import dataclasses

        identity = Identity.ephemeral()
        now = reactor().seconds()
        cert = issue_membership(swarm.key, identity.node_id, now, now + 3600)
        return dataclasses.replace(identity, membership=cert.encode())

    echo = {"echo": lambda peer, m: m}
    server = Endpoint(reactor(), member(), echo, swarm=swarm.policy)
    friend = Endpoint(reactor(), member(), echo, swarm=swarm.policy)
    outsider = Endpoint(reactor(), Identity.ephemeral(), echo)
    try:
        for endpoint in (server, friend, outsider):
            await within(endpoint.listen("127.0.0.1"))
        reply = await within(friend.request(server.address, Message("echo", {"n": 1})))
        assert reply.fields == {"n": 1}
        with pytest.raises(RemoteError) as refused:
            await within(outsider.request(server.address, Message("echo"), timeout=TIMEOUT))
        assert refused.value.code == "not_a_member"
        with pytest.raises(NotAMember):
            await within(server.request(outsider.address, Message("echo"), timeout=TIMEOUT))
        append_revoked(revoked, friend.identity.node_id)
        assert swarm.policy.reload() == {friend.identity.node_id}
        with pytest.raises(RemoteError) as dropped:
            await within(friend.request(server.address, Message("echo"), timeout=TIMEOUT))
        assert dropped.value.code == "not_a_member" and "revoked" in dropped.value.message
    finally:
        await within(gatherResults([e.close() for e in (server, friend, outsider)]))


@pytest_twisted.ensureDeferred
async def test_dht_of_a_swarm_refuses_outsiders_and_holds_only_members_records():
    """When an outsider tries to join a swarm's DHT, then the bootstrap fails saying
    ``not_a_member``; members join and find each other's records."""
    import dataclasses

    from meshnode.swarm.membership import issue_membership
    from meshnode.swarm.policy import SwarmPolicy

    swarm = Swarm()
    policy = SwarmPolicy(swarm.key.public_key(), reactor())

    def member() -> Identity:
        identity = Identity.ephemeral()
        now = reactor().seconds()
        cert = issue_membership(swarm.key, identity.node_id, now, now + 3600)
        return dataclasses.replace(identity, membership=cert.encode())

    endpoints = [Endpoint(reactor(), member(), swarm=policy) for _ in range(3)]
    endpoints.append(Endpoint(reactor(), Identity.ephemeral()))
    nodes = []
    try:
        for endpoint in endpoints:
            await within(endpoint.listen("127.0.0.1"))
            nodes.append(DHTNode(endpoint, reactor(), reactor()))
        seed = endpoints[0].address
        for node in nodes[1:3]:
            await within(node.bootstrap([seed]))
        with pytest.raises(DHTError, match="not_a_member"):
            await within(nodes[3].bootstrap([seed]))
        key = bytes(range(32))
        await within(nodes[1].store(key, {"who": 1}, reactor().seconds() + 60))
        found = await within(nodes[2].get(key))
        assert list(found) == [endpoints[1].identity.node_id]
        assert all(n.table.get(endpoints[3].identity.node_id) is None for n in nodes[:3])
    finally:
        for node in nodes:
            await node.stop()
        await within(gatherResults([e.close() for e in endpoints]))
