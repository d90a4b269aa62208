"""Records of dead workers expire in the DHT, and clients stop routing to them.

DHT nodes on an in-memory network and a fake clock; two workers announce the
same blocks with the real ``Announcer``; one keeps refreshing, the other dies
right after its first announcement (no offline record).
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from meshnode.client.routing.route import candidates_from_records, span_route
from meshnode.dht.network import block_key
from meshnode.errors import RouteNotFound
from meshnode.inference.directory import fetch_block_records
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.worker.announce import DEFAULT_INTERVAL, DEFAULT_TTL, Announcer
from tests.dht.dht_helpers import FakeNetwork, bootstrap_all, make_nodes, run_for, settle

MODEL = "fingerprint"
SPAN = BlockSpan(0, 4)


def key_for(block: int) -> bytes:
    return block_key(MODEL, block)


def announcer(node, clock) -> Announcer:
    def info(state: WorkerState) -> ServerInfo:
        return ServerInfo(str(node.endpoint.address), SPAN, state, 10.0, 1000, "float32", MODEL)

    return Announcer(node, clock, SPAN, key_for, info)


def test_announcements_expire_within_minutes_and_refresh_three_times_per_life():
    """When a worker's record is not refreshed, then it lives at most a few minutes; a live
    worker refreshes at least three times per record lifetime."""
    assert DEFAULT_TTL <= 300
    assert DEFAULT_INTERVAL * 3 <= DEFAULT_TTL


def test_a_dead_workers_records_expire_and_routes_avoid_it():
    """When one of two workers of the same blocks dies without saying so, then until its
    records expire both are listed, afterwards only the live one, routes go through the
    live one, and with that one banned the missing blocks are named."""
    clock = Clock()
    network = FakeNetwork(clock)
    nodes = make_nodes(network, 8)
    bootstrap_all(network, nodes)
    live, dead, client = nodes[1], nodes[2], nodes[7]
    settle(clock, announcer(live, clock).start())
    settle(clock, announcer(dead, clock).announce(WorkerState.ONLINE))
    settle(clock, dead.stop())
    dead.endpoint.close()

    def workers() -> dict:
        records = settle(
            clock, Deferred.fromCoroutine(fetch_block_records(client, key_for, SPAN.end))
        )
        return candidates_from_records(records)

    assert set(workers()) == {live.endpoint.identity.node_id, dead.endpoint.identity.node_id}
    run_for(clock, DEFAULT_TTL + 1, step=0.5)
    found = workers()
    assert set(found) == {live.endpoint.identity.node_id}
    route = span_route(found, SPAN, MODEL)
    assert [hop.node_id for hop in route.hops] == [live.endpoint.identity.node_id]
    with pytest.raises(RouteNotFound) as caught:
        span_route(found, SPAN, MODEL, banned={live.endpoint.identity.node_id})
    assert caught.value.missing == (0, 1, 2, 3)
