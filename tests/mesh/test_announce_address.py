"""``--announce-address`` on real processes: a bootstrap node and two workers of the tiny
checkpoint, each behind its own delaying relay; peers reach them only through the relays."""

from __future__ import annotations

import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.client.routing.route import candidates_from_records
from meshnode.identity import PeerAddress
from tests.mesh.mesh_helpers import prompts, with_timeout

NEW_TOKENS = 8
RELAY_DELAY_MS = 2.0


@pytest.fixture(scope="module")
def relayed_mesh(tiny_checkpoint, tmp_path_factory):
    from meshnode.testing.processes import LocalMesh

    mesh = LocalMesh(str(tiny_checkpoint), root=tmp_path_factory.mktemp("relayed-mesh"))
    try:
        mesh.start_bootstrap(relay_delay_ms=RELAY_DELAY_MS)
        mesh.start_workers(("0:3", "3:6"), relay_delay_ms=RELAY_DELAY_MS)
    except BaseException:
        mesh.stop()
        raise
    yield mesh
    mesh.stop()


def listening_port(node) -> int:
    return PeerAddress.parse((node.data_dir / "listening").read_text().strip()).port


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_peers_dial_the_announced_address(relayed_mesh, tiny_checkpoint, tiny_local):
    """When every node is started with --announce-address of its relay, then the address files,
    the block records and the DHT contacts a client learns name the relays (never the ports
    the nodes listen on), a generation through them equals local generation, and each relay
    saw the connections peers made."""
    from twisted.internet import reactor

    from meshnode.client.api import MeshClient

    nodes = relayed_mesh.nodes
    relays = {node.relay.port: node for node in nodes}
    hidden = {listening_port(node) for node in nodes}
    assert not hidden & set(relays)
    assert all(node.address.port == node.relay.port for node in nodes)

    client = MeshClient(reactor, [relayed_mesh.join_address], str(tiny_checkpoint))
    try:
        await with_timeout(client.start(), reactor)
        records = await with_timeout(client.block_records(), reactor)
        workers = candidates_from_records(records)
        announced = {PeerAddress.parse(info.address) for info in workers.values()}
        assert announced == {node.address for node in relayed_mesh.workers()}
        contacts = client.dht.table.contacts()
        assert contacts and all(contact.port in relays for contact in contacts)

        ids = prompts(1, 64, seed=11)[0]
        options = GenerationOptions(max_new_tokens=NEW_TOKENS)
        result = await with_timeout(client.generate_ids(ids, options), reactor)
        local = tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS)
        assert list(result.token_ids) == list(local.token_ids)
    finally:
        await client.close()
    for node in nodes:
        assert node.relay.stats()["connections"] >= 1, node.name


#: seconds to wait for the workers' probes to reach their records (two 20 s rounds, at most)
LINKS_DEADLINE = 120.0


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_workers_publish_their_links_through_the_relays(relayed_mesh, tiny_checkpoint):
    """When two workers are route neighbours, then each soon publishes its round trip to the
    other, measured through the other's relay: at least the relay's delay both ways."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from meshnode.client.api import MeshClient

    client = MeshClient(reactor, [relayed_mesh.join_address], str(tiny_checkpoint))
    try:
        await with_timeout(client.start(), reactor)
        deadline = reactor.seconds() + LINKS_DEADLINE
        while True:
            records = await with_timeout(client.block_records(), reactor)
            workers = candidates_from_records(records)
            links = {(a, b): info.peer_rtt(b) for a, info in workers.items() for b in workers
                     if a != b}
            if len(workers) == 2 and all(rtt is not None for rtt in links.values()):
                break
            assert reactor.seconds() < deadline, f"links not published: {links}"
            await deferLater(reactor, 1.0, lambda: None)
    finally:
        await client.close()
    assert all(2 * RELAY_DELAY_MS / 1e3 <= rtt < 5.0 for rtt in links.values()), links
