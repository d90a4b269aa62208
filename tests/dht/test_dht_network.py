"""DHTNode on the in-memory network with a fake clock: lookups, expiry, republish,
refresh, dead nodes, stop."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from meshnode.dht import messages
from meshnode.dht.network import REFRESH_INTERVAL, REPUBLISH_INTERVAL, SWEEP_INTERVAL, block_key
from meshnode.dht.node import distance
from meshnode.dht.records import MAX_RECORD_TTL
from meshnode.dht.routing import K
from meshnode.errors import DHTError, InvalidRecord
from meshnode.identity import PeerAddress
from tests.dht.dht_helpers import FakeNetwork, bootstrap_all, make_nodes, run_for, settle

START = 1_000_000.0


@pytest.fixture
def network() -> FakeNetwork:
    clock = Clock()
    clock.advance(START)
    return FakeNetwork(clock)


@pytest.fixture
def mesh(network: FakeNetwork):
    nodes = make_nodes(network, 40)
    bootstrap_all(network, nodes)
    yield nodes
    for node in nodes:
        node.stop()


def holders(nodes, key: bytes) -> set[bytes]:
    return {n.node_id for n in nodes if n.storage.get(key)}


def k_closest(nodes, key: bytes) -> set[bytes]:
    return {n.node_id for n in sorted(nodes, key=lambda n: distance(n.node_id, key))[:K]}


def test_every_node_finds_a_record_stored_by_another(network: FakeNetwork, mesh) -> None:
    """When one node stores a record, then it lands on the k closest nodes and every
    other node gets it back, verified."""
    key = block_key("model", 0)
    writer = mesh[7]
    held = settle(network.clock, writer.store(key, {"port": 7}, START + 300))
    assert held == K
    assert holders(mesh, key) == k_closest(mesh, key)
    for node in mesh:
        found = settle(network.clock, node.get(key))
        assert set(found) == {writer.node_id}
        assert found[writer.node_id].value == {"port": 7}


def test_one_key_gathers_the_records_of_many_writers(network: FakeNetwork, mesh) -> None:
    """When several nodes store under one key, then a get returns each writer's latest."""
    key = block_key("model", 1)
    writers = mesh[:6]
    for i, writer in enumerate(writers):
        settle(network.clock, writer.store(key, {"i": i}, START + 300))
    settle(network.clock, writers[0].store(key, {"i": 100}, START + 400))
    found = settle(network.clock, mesh[-1].get(key))
    assert {subkey: r.value["i"] for subkey, r in found.items()} == {
        w.node_id: (100 if i == 0 else i) for i, w in enumerate(writers)
    }


def test_lookup_routes_around_dead_nodes_and_drops_them(network: FakeNetwork, mesh) -> None:
    """When a third of the nodes die (some closed, some hung), then gets still find the
    record and the dead nodes a lookup met are gone from the asker's table."""
    key = block_key("model", 2)
    settle(network.clock, mesh[0].store(key, {"v": 1}, START + 300))
    dead = mesh[1::3]
    for i, node in enumerate(dead):
        if i % 2:
            node.endpoint.close()
        else:
            node.endpoint.frozen = True
    dead_ids = {n.node_id for n in dead}
    alive = [n for n in mesh if n.node_id not in dead_ids]
    for node in alive:
        assert set(settle(network.clock, node.get(key))) == {mesh[0].node_id}
        met = {c.node_id for c in node.last_lookup.closest}
        assert not met & dead_ids


def test_expired_records_disappear(network: FakeNetwork, mesh) -> None:
    """When a record's expiry passes, then no get returns it and sweeps free it."""
    key = block_key("model", 3)
    settle(network.clock, mesh[0].store(key, {"v": 1}, START + 100))
    assert settle(network.clock, mesh[1].get(key))
    network.clock.advance(101.0)
    assert settle(network.clock, mesh[1].get(key)) == {}
    run_for(network.clock, SWEEP_INTERVAL)
    assert all(len(node.storage) == 0 for node in mesh)


def test_owner_republishes_to_the_new_closest_nodes(network: FakeNetwork, mesh) -> None:
    """When the nodes holding a record die and others join, then the owner's periodic
    republish puts the record on the k closest live nodes before it expires."""
    key = block_key("model", 4)
    owner = mesh[0]
    settle(network.clock, owner.store(key, {"v": 1}, START + MAX_RECORD_TTL))
    first_holders = holders(mesh, key) - {owner.node_id}
    for node in mesh:
        if node.node_id in first_holders:
            node.endpoint.close()
    newcomers = make_nodes(network, 10)
    for node in newcomers:
        settle(network.clock, node.bootstrap([owner.endpoint.address]))
    alive = [n for n in mesh + newcomers if n.node_id not in first_holders]
    run_for(network.clock, REPUBLISH_INTERVAL + 5.0)
    assert holders(alive, key) == k_closest(alive, key)
    assert owner.node_id in settle(network.clock, newcomers[-1].get(key))
    for node in mesh + newcomers:
        node.stop()


def test_republish_stops_at_expiry(network: FakeNetwork, mesh) -> None:
    """When an owned record expires, then the owner stops republishing it."""
    key = block_key("model", 5)
    owner = mesh[0]
    settle(network.clock, owner.store(key, {"v": 1}, START + REPUBLISH_INTERVAL / 2))
    run_for(network.clock, REPUBLISH_INTERVAL + 5.0)
    assert settle(network.clock, owner.republish()) == 0
    assert holders(mesh, key) == set()


def test_stale_buckets_are_refreshed(network: FakeNetwork, mesh) -> None:
    """When a bucket sees no lookup for the refresh interval, then the node looks up a
    random id in it, which leaves no bucket stale."""
    node = mesh[5]
    before = network.requests
    network.clock.advance(REFRESH_INTERVAL - 1.0)
    assert node.table.stale_buckets(network.clock.seconds(), REFRESH_INTERVAL) == []
    run_for(network.clock, 700.0)
    assert network.requests > before
    now = network.clock.seconds()
    assert node.table.stale_buckets(now, REFRESH_INTERVAL) == []
    assert all(now - b.last_touched < 700.0 for b in node.table.buckets)


def test_bootstrap_through_an_unpinned_address_learns_and_proves_the_id(
    network: FakeNetwork,
) -> None:
    """When a node joins through host:port without an id, then it learns the seed's id
    and holds it in its table; a wrong pinned id makes the bootstrap fail."""
    seed, joiner, other = make_nodes(network, 3)
    unpinned = PeerAddress("127.0.0.1", seed.endpoint.address.port)
    assert settle(network.clock, joiner.bootstrap([unpinned])) == 1
    assert seed.node_id in joiner.table
    wrong = PeerAddress("127.0.0.1", seed.endpoint.address.port, other.node_id)
    with pytest.raises(DHTError, match="no bootstrap peer answered"):
        settle(network.clock, other.bootstrap([wrong]))


def test_a_store_no_node_would_accept_fails_at_once(network: FakeNetwork, mesh) -> None:
    """When the expiry is too far out, then store fails with InvalidRecord, sending nothing."""
    before = network.requests
    with pytest.raises(InvalidRecord, match="too far out"):
        settle(network.clock, mesh[0].store(bytes(32), {}, START + MAX_RECORD_TTL + 10))
    assert network.requests == before


def test_stop_cancels_calls_in_flight(network: FakeNetwork, mesh) -> None:
    """When a node stops during a lookup, then the lookup fails with CancelledError,
    nothing of it stays pending, and it answers no more requests."""
    node = mesh[3]
    for other in mesh:
        if other is not node:
            other.endpoint.frozen = True
    d = node.get(block_key("model", 9))
    network.clock.advance(0.5)
    assert node.protocol._pending
    node.stop()
    with pytest.raises(CancelledError):
        settle(network.clock, d)
    assert not node.protocol._pending and not node._running
    with pytest.raises(DHTError):
        settle(network.clock, node.get(block_key("model", 9)))
    with pytest.raises(DHTError):
        node.protocol.rpc_ping(None, messages.ping(1))
