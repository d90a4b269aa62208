"""64 DHT nodes in one process over real mutual TLS on loopback (ephemeral ports).

Every node finds a record another node stored; forged records are refused by
every node; after a quarter of the nodes stop, the owners' republication keeps
every record on the k closest live nodes, where every live node finds it.
"""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from meshnode.dht.node import Contact, block_key
from meshnode.dht.records import sign_record, signing_payload
from meshnode.dht.routing import K
from meshnode.dht.swarm import LocalSwarm
from meshnode.errors import RemoteError
from meshnode.identity import Identity

NODES = 64
STEP_TIMEOUT = 60.0
MODEL = "integration-model"

pytestmark = pytest.mark.timeout(180)


def reactor():
    from twisted.internet import reactor

    return reactor


def within(deferred: Deferred, seconds: float = STEP_TIMEOUT) -> Deferred:
    return deferred.addTimeout(seconds, reactor())


def contact_of(swarm: LocalSwarm, index: int) -> Contact:
    address = swarm.endpoints[index].address
    return Contact(address.node_id, address.host, address.port)


async def in_batches(deferred_makers, size: int = 16) -> list:
    results = []
    for start in range(0, len(deferred_makers), size):
        batch = [make() for make in deferred_makers[start : start + size]]
        results += await within(gatherResults(batch, consumeErrors=True))
    return results


def key_of(index: int) -> bytes:
    return block_key(MODEL, index)


async def assert_refused_everywhere(swarm: LocalSwarm, sender: int, record) -> None:
    outcomes = await within(
        gatherResults(
            [
                swarm.nodes[sender]
                .protocol.call_store(contact_of(swarm, i), record)
                .addCallbacks(lambda kept: ("kept", kept), lambda f: ("refused", f.value))
                for i in range(len(swarm.nodes))
                if i != sender
            ]
        )
    )
    for verdict, detail in outcomes:
        assert verdict == "refused"
        assert isinstance(detail, RemoteError) and detail.code == "invalid_record"
    assert all(
        record.subkey not in n.storage.get(record.key)
        or n.storage.get(record.key)[record.subkey] != record
        for n in swarm.nodes
    )


@pytest_twisted.ensureDeferred
async def test_sixty_four_nodes_over_tls() -> None:
    """When 64 nodes join over TLS and each stores a record, then every node finds a
    record stored by another; forged records are refused by all; and after 16 nodes
    stop and the owners republish, every live node still finds the records."""
    swarm = await within(Deferred.fromCoroutine(LocalSwarm.start(reactor(), NODES)), 120.0)
    try:
        expiration = reactor().seconds() + 600
        held = await in_batches(
            [
                (lambda i=i: swarm.nodes[i].store(key_of(i), {"writer": i}, expiration))
                for i in range(NODES)
            ]
        )
        assert all(count >= K // 2 for count in held), held

        # every node finds the record of a different node
        found = await in_batches(
            [(lambda i=i: swarm.nodes[i].get(key_of((i + 1) % NODES))) for i in range(NODES)]
        )
        for i, records in enumerate(found):
            writer = swarm.nodes[(i + 1) % NODES]
            assert set(records) == {writer.node_id}
            assert records[writer.node_id].value == {"writer": (i + 1) % NODES}

        # forged records: wrong signer, sub-key of another node, tampered value
        attacker = Identity.ephemeral()
        victim = swarm.nodes[5]
        genuine = victim.storage.get(key_of(5)).get(victim.node_id) or sign_record(
            victim.identity, key_of(5), {"writer": 5}, expiration
        )
        payload = signing_payload(key_of(5), victim.node_id, {"writer": "evil"}, expiration)
        wrong_signer = dataclasses.replace(
            genuine, value={"writer": "evil"}, signature=attacker.sign(payload)
        )
        foreign_subkey = dataclasses.replace(
            sign_record(attacker, key_of(5), {"writer": "evil"}, expiration),
            subkey=victim.node_id,
        )
        tampered = dataclasses.replace(genuine, value={"writer": "evil"})
        for forged in (wrong_signer, foreign_subkey, tampered):
            await assert_refused_everywhere(swarm, 9, forged)
        records = await within(swarm.nodes[40].get(key_of(5)))
        assert records[victim.node_id].value == {"writer": 5}

        # a quarter of the nodes stop; the owners that remain republish
        stopped = set(range(3, NODES, 4))
        await within(
            gatherResults(
                [Deferred.fromCoroutine(swarm.stop_node(i)) for i in sorted(stopped)],
                consumeErrors=True,
            )
        )
        alive = [i for i in range(NODES) if i not in stopped]
        live_nodes = [swarm.nodes[i] for i in alive]
        await in_batches([(lambda i=i: swarm.nodes[i].republish()) for i in alive])
        for i in alive:
            holders = [n for n in live_nodes if n.storage.get(key_of(i))]
            assert len(holders) >= K, f"record {i} on {len(holders)} live nodes after republish"
        found = await in_batches(
            [
                (lambda j=j: swarm.nodes[alive[j]].get(key_of(alive[(j + 1) % len(alive)])))
                for j in range(len(alive))
            ]
        )
        for j, records in enumerate(found):
            writer = swarm.nodes[alive[(j + 1) % len(alive)]]
            assert set(records) == {writer.node_id}
    finally:
        await within(Deferred.fromCoroutine(swarm.stop()))
