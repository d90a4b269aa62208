"""The dht.* RPCs on the in-memory network: who enters the table, what is refused."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet.task import Clock

from meshnode.dht import messages
from meshnode.dht.node import Contact, int_to_id
from meshnode.dht.records import sign_record
from meshnode.dht.routing import K
from meshnode.errors import BadRequest, ConnectionClosed, RemoteError, RequestTimeout
from meshnode.identity import Identity
from meshnode.wire.message import Message
from tests.dht.dht_helpers import FakeNetwork, make_nodes, settle

KEY = bytes(range(32))


@pytest.fixture
def network() -> FakeNetwork:
    clock = Clock()
    clock.advance(1_000_000.0)
    return FakeNetwork(clock)


def test_a_ping_puts_the_verified_sender_in_the_table(network: FakeNetwork) -> None:
    """When a listening node pings another, then both tables hold the other, with
    the id the transport verified and the port the sender announced."""
    a, b = make_nodes(network, 2)
    claimed = settle(network.clock, a.protocol.call_ping(b.endpoint.address))
    assert claimed == b.node_id
    assert b.table.get(a.node_id) == Contact(a.node_id, "127.0.0.1", a.endpoint.address.port)
    assert a.table.get(b.node_id) == Contact(b.node_id, "127.0.0.1", b.endpoint.address.port)


def test_a_node_that_does_not_listen_stays_out_of_tables(network: FakeNetwork) -> None:
    """When a client without a listening port pings, then it is answered but not added."""
    (server,) = make_nodes(network, 1)
    client_endpoint = network.endpoint()
    request = settle(
        network.clock, client_endpoint.request(server.endpoint.address, messages.ping(None), 5.0)
    )
    assert request.fields["id"] == server.node_id
    assert len(server.table) == 0


def test_the_id_in_a_request_is_never_trusted(network: FakeNetwork) -> None:
    """When a request's fields claim another node's id, then the table records the
    TLS-verified sender instead."""
    a, b = make_nodes(network, 2)
    victim = Identity.ephemeral().node_id
    forged = Message(messages.PING, {"v": 1, "port": 4242, "id": victim})
    settle(network.clock, a.endpoint.request(b.endpoint.address, forged, 5.0))
    assert victim not in b.table
    assert b.table.get(a.node_id).port == 4242


def test_malformed_requests_get_bad_request(network: FakeNetwork) -> None:
    """When a request's fields are missing or mistyped, then the peer gets bad_request."""
    a, b = make_nodes(network, 2)
    for fields in ({"v": 1, "port": 1}, {"v": 1, "port": "x", "target": KEY}):
        d = a.endpoint.request(b.endpoint.address, Message(messages.FIND_NODE, fields), 5.0)
        with pytest.raises(RemoteError) as caught:
            settle(network.clock, d)
        assert caught.value.code == "bad_request"


def test_find_node_answers_the_closest_known_except_the_asker(network: FakeNetwork) -> None:
    """When asked for a target, then a node answers its k closest contacts, never the asker."""
    nodes = make_nodes(network, 30)
    hub = nodes[0]
    for node in nodes[1:]:
        settle(network.clock, node.protocol.call_ping(hub.endpoint.address))
    asker = Contact(nodes[1].node_id, "127.0.0.1", nodes[1].endpoint.address.port)
    answer = settle(network.clock, nodes[1].protocol.call_find_node(asker_contact(hub), KEY))
    expected = hub.table.closest(KEY, exclude=[asker.node_id])
    assert answer.contacts == expected
    assert len(answer.contacts) == K


def asker_contact(node) -> Contact:
    return Contact(node.node_id, "127.0.0.1", node.endpoint.address.port)


def test_forged_stores_are_refused_with_invalid_record(network: FakeNetwork) -> None:
    """When a peer stores a tampered or foreign-sub-key record, then it gets an
    invalid_record error frame and nothing is stored."""
    a, b = make_nodes(network, 2)
    now = network.clock.seconds()
    good = sign_record(a.identity, KEY, {"port": 1}, now + 60)
    tampered = dataclasses.replace(good, value={"port": 2})
    other = Identity.ephemeral()
    foreign = dataclasses.replace(sign_record(other, KEY, {"port": 1}, now + 60), subkey=a.node_id)
    for record in (tampered, foreign):
        with pytest.raises(RemoteError) as caught:
            settle(network.clock, a.protocol.call_store(asker_contact(b), record))
        assert caught.value.code == "invalid_record"
    assert b.storage.get(KEY) == {}
    assert settle(network.clock, a.protocol.call_store(asker_contact(b), good)) is True
    assert b.storage.get(KEY) == {a.node_id: good}


def test_records_in_find_value_answers_are_verified(network: FakeNetwork) -> None:
    """When a peer answers FIND_VALUE with a tampered record, then the asker drops it
    and keeps the valid ones."""
    a, b = make_nodes(network, 2)
    now = network.clock.seconds()
    good = sign_record(b.identity, KEY, {"port": 1}, now + 60)
    bad = dataclasses.replace(sign_record(Identity.ephemeral(), KEY, {"p": 1}, now + 60), value={})
    b.endpoint.add_handler(messages.FIND_VALUE, lambda peer, m: messages.value([good, bad], []))
    answer = settle(network.clock, a.protocol.call_find_value(asker_contact(b), KEY))
    assert answer.records == [good]


def test_unreachable_and_garbage_answering_peers_leave_the_table(network: FakeNetwork) -> None:
    """When a contact refuses connections, hangs, or answers garbage, then it is dropped;
    a peer answering an error frame stays."""
    a, closed, hung, liar, grumpy = make_nodes(network, 5)
    for peer in (closed, hung, liar, grumpy):
        settle(network.clock, a.protocol.call_ping(peer.endpoint.address))
    assert len(a.table) == 4
    closed.endpoint.close()
    hung.endpoint.frozen = True
    liar.endpoint.add_handler(messages.FIND_NODE, lambda p, m: Message(messages.NODES, {}))
    grumpy.endpoint.add_handler(messages.FIND_NODE, lambda p, m: 1 / 0)
    expected = [
        (closed, ConnectionClosed),
        (hung, RequestTimeout),
        (liar, BadRequest),
        (grumpy, RemoteError),
    ]
    for peer, error in expected:
        with pytest.raises(error):
            settle(network.clock, a.protocol.call_find_node(asker_contact(peer), KEY))
    assert {c.node_id for c in a.table.contacts()} == {grumpy.node_id}


def test_a_contact_whose_connection_drops_is_pinged_and_dropped_if_gone(
    network: FakeNetwork,
) -> None:
    """When a contact's connection drops, then nodes ping it at once: a node that left
    leaves their tables before any lookup trips over it."""
    nodes = make_nodes(network, 4)
    for node in nodes[1:]:
        settle(network.clock, node.protocol.call_ping(nodes[0].endpoint.address))
    leaving = nodes[3]
    assert all(leaving.node_id in n.table for n in nodes[:1])
    leaving.endpoint.close()
    network.clock.advance(1.0)
    assert all(leaving.node_id not in n.table for n in nodes[:3])
    assert nodes[1].node_id in nodes[0].table


def _far_id(own: bytes, i: int) -> bytes:
    """The i-th id in the half of the id space away from ``own`` (top bit flipped)."""
    top = (int.from_bytes(own, "big") >> 255) ^ 1
    return int_to_id((top << 255) | (i * 7919 + 1))


def _live_far_node(network: FakeNetwork, own: bytes):
    """A listening node whose id lies in the half of the space away from ``own``."""
    while True:
        (node,) = make_nodes(network, 1)
        if (node.node_id[0] ^ own[0]) & 0x80:
            return node


def _fill_far_bucket(a, oldest: Contact) -> None:
    a.table.add(oldest, 0.0)
    for i in range(1, K):
        a.table.add(Contact(_far_id(a.node_id, i), "127.0.0.1", 30000 + i), 0.0)


@pytest.mark.parametrize("oldest_alive", [True, False])
def test_full_bucket_evicts_its_oldest_only_when_it_does_not_answer(
    network: FakeNetwork, oldest_alive: bool
) -> None:
    """When a newcomer arrives at a full far bucket, then its oldest contact is pinged:
    if it answers it stays and the newcomer waits as a replacement; if not, the
    newcomer takes its place."""
    (a,) = make_nodes(network, 1)
    if oldest_alive:
        live = _live_far_node(network, a.node_id)
        oldest = Contact(live.node_id, "127.0.0.1", live.endpoint.address.port)
    else:
        oldest = Contact(_far_id(a.node_id, 0), "127.0.0.1", 29999)
    _fill_far_bucket(a, oldest)
    newcomer = Contact(_far_id(a.node_id, 999), "127.0.0.1", 31000)
    a.protocol.welcome(newcomer)
    bucket = a.table.bucket_for(newcomer.node_id)
    assert bucket.is_full and not bucket.covers(a.node_id)
    assert newcomer.node_id in bucket.replacements
    network.clock.advance(1.0)
    assert (oldest.node_id in a.table) is oldest_alive
    assert (newcomer.node_id in a.table) is not oldest_alive
    assert len(bucket) == K


def test_an_announced_address_is_what_peers_keep_and_pass_on(network: FakeNetwork) -> None:
    """When a node announces an address other than its listening one (a relay), then a peer
    it pings keeps that host and port for it, and hands them to whoever looks it up."""
    from meshnode.dht.network import DHTNode
    from meshnode.identity import PeerAddress

    relay = PeerAddress("relay.example.org", 7443)
    (b,) = make_nodes(network, 1)
    endpoint = network.endpoint()
    endpoint.listen()
    hidden = DHTNode(endpoint, network.clock, announced=relay)
    settle(network.clock, hidden.protocol.call_ping(b.endpoint.address))
    assert b.table.get(hidden.node_id) == Contact(hidden.node_id, relay.host, relay.port)
    asker = network.endpoint()
    answer = settle(
        network.clock,
        asker.request(b.endpoint.address, messages.find_node(None, hidden.node_id), 5.0),
    )
    assert messages.contacts_field(answer.fields) == [
        Contact(hidden.node_id, relay.host, relay.port)
    ]


def test_an_announced_host_that_is_not_a_name_is_refused(network: FakeNetwork) -> None:
    """When a request announces an empty or non-text host, then it is refused as bad and the
    sender stays out of the table."""
    a, b = make_nodes(network, 2)
    for host in ("", 7, "x" * 300):
        forged = Message(messages.PING, {"v": 1, "port": 4242, "host": host})
        with pytest.raises(RemoteError):
            settle(network.clock, a.endpoint.request(b.endpoint.address, forged, 5.0))
    assert a.node_id not in b.table
