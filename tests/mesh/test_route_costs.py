"""Route costs: the links between consecutive workers (forwarding) and the load of each worker
(batching), over fake records."""

from __future__ import annotations

import dataclasses

import pytest

from meshnode.client.routing.costs import (
    DEFAULT_RTT,
    LinkCosts,
    step_seconds,
    throughput_at,
)
from meshnode.client.routing.route import find_route, span_route
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState


def nid(n: int) -> bytes:
    return bytes([n]) * 32


def worker(start, end, throughput=100.0, **fields) -> ServerInfo:
    return ServerInfo(
        f"127.0.0.1:{start}{end}", BlockSpan(start, end), WorkerState.ONLINE, throughput, 1000,
        "float32", "m", **fields,
    )


def rtts_to(*pairs: tuple[int, float]) -> tuple[tuple[bytes, float], ...]:
    return tuple((nid(n)[:8], rtt) for n, rtt in pairs)


def hops(route) -> list[bytes]:
    return [hop.node_id for hop in route.hops]


def three_stage_mesh() -> dict[bytes, ServerInfo]:
    """A (0:10), then B1 or B2 (10:20), then C (20:30); B2 is far from A and from C."""
    return {
        nid(1): worker(0, 10, peer_rtts=rtts_to((2, 0.002), (3, 0.2))),
        nid(2): worker(10, 20, peer_rtts=rtts_to((4, 0.002))),
        nid(3): worker(10, 20, peer_rtts=rtts_to((4, 0.2))),
        nid(4): worker(20, 30),
    }


def test_forwarded_route_avoids_the_far_worker():
    """When forwarding and two workers of a span compute alike, then the route goes through the
    one whose published links to its neighbours are short, even if the client is a bit nearer
    to the far one (which a client-driven route prefers)."""
    workers = three_stage_mesh()
    rtts = {nid(1): 0.01, nid(2): 0.011, nid(3): 0.01, nid(4): 0.01}
    assert hops(find_route(workers, 30, "m", rtts, forwarding=True)) == [nid(1), nid(2), nid(4)]
    assert hops(find_route(workers, 30, "m", rtts)) == [nid(1), nid(3), nid(4)]


def test_forwarded_cost_counts_each_link_once_one_way():
    """When forwarding, then a route's expected latency is half of each round trip it crosses
    (client to first, between hops, last to client) plus its compute; client-driven, a full
    round trip per hop."""
    workers = three_stage_mesh()
    rtts = {nid(1): 0.01, nid(2): 0.02, nid(3): 0.01, nid(4): 0.03}
    compute = 3 * (1 / 100.0)
    forwarded = find_route(workers, 30, "m", rtts, forwarding=True)
    assert forwarded.expected_latency == pytest.approx(
        0.01 / 2 + 0.002 / 2 + 0.002 / 2 + 0.03 / 2 + compute
    )
    driven = find_route(workers, 30, "m", {**rtts, nid(3): 1.0})
    assert driven.expected_latency == pytest.approx(0.01 + 0.02 + 0.03 + compute)


def test_forwarding_prefers_fewer_hops_on_long_links():
    """When every link is long, then forwarding still prefers one worker of everything over
    three that need two more links, at equal compute."""
    workers = {
        nid(1): worker(0, 30),
        nid(2): worker(0, 10, throughput=300.0),
        nid(3): worker(10, 20, throughput=300.0),
        nid(4): worker(20, 30, throughput=300.0),
    }
    rtts = dict.fromkeys(workers, 0.1)
    assert hops(find_route(workers, 30, "m", rtts, forwarding=True)) == [nid(1)]


def test_unpublished_link_is_estimated_from_the_clients_round_trips():
    """When neither end published the link, then its round trip is the mean of the client's
    round trips to both ends; one side published: that; both: their mean; nothing known: the
    default."""
    workers = {
        nid(1): worker(0, 10, peer_rtts=rtts_to((2, 0.004))),
        nid(2): worker(10, 20, peer_rtts=rtts_to((1, 0.006))),
        nid(3): worker(10, 20, peer_rtts=rtts_to((1, 0.008))),
        nid(4): worker(20, 30),
    }
    links = LinkCosts({nid(1): 0.01, nid(4): 0.03}, workers)
    assert links.between(nid(1), nid(2)) == pytest.approx(0.005)
    assert links.between(nid(3), nid(1)) == pytest.approx(0.008)
    assert links.between(nid(1), nid(4)) == pytest.approx(0.02)
    assert links.between(nid(2), nid(4)) == DEFAULT_RTT
    assert links.client(nid(2)) == DEFAULT_RTT


def test_a_worker_is_never_two_consecutive_hops():
    """When forwarding, then a route never passes a worker on to itself (one hop covers its
    blocks instead)."""
    workers = {nid(1): worker(0, 30), nid(2): worker(0, 30, throughput=50.0)}
    route = find_route(workers, 30, "m", {nid(1): 0.01, nid(2): 0.01}, forwarding=True)
    assert hops(route) == [nid(1)]


def test_recovered_span_counts_its_ends_as_the_client():
    """When forwarding and only a span is routed (recovery), then its hops are chosen with the
    same link costs, shifted back to absolute blocks."""
    route = span_route(three_stage_mesh(), BlockSpan(10, 20), "m", forwarding=True)
    assert [str(hop.span) for hop in route.hops] == ["10:20"]


def test_interpolated_batch_throughput():
    """When a worker announces points of its batch curve, then the speed between them is
    interpolated, held flat past the last, and scaled to the throughput the client uses."""
    info = worker(0, 10, throughput=100.0, batch_throughput=((1, 100.0), (4, 250.0), (16, 400.0)))
    assert throughput_at(info, 1) == 100.0
    assert throughput_at(info, 2) == pytest.approx(150.0)
    assert throughput_at(info, 10) == pytest.approx(325.0)
    assert throughput_at(info, 64) == 400.0
    measured = dataclasses.replace(info, throughput=50.0)  # the client measured it slower
    assert throughput_at(measured, 4) == pytest.approx(125.0)


def test_step_time_at_the_workers_load():
    """When a worker is loaded, then a new step takes the time of a row in a batch one larger;
    without a curve, a loaded worker runs the steps ahead of it first."""
    idle = worker(0, 10, throughput=100.0)
    assert step_seconds(idle) == pytest.approx(0.01)
    assert step_seconds(idle, tokens=8) == pytest.approx(0.08)
    scaling = dataclasses.replace(idle, batch_load=3, batch_throughput=((1, 100.0), (4, 400.0)))
    assert step_seconds(scaling) == pytest.approx(0.01)
    serial = dataclasses.replace(idle, batch_load=3)
    assert step_seconds(serial) == pytest.approx(0.04)


def test_route_prefers_the_idle_worker_to_the_saturated_one():
    """When two workers serve the same blocks at the same single-step speed and one is loaded
    past the point where batching helps, then the route goes through the idle one; when the
    loaded one still scales with its batch, it costs no more than the idle one."""
    curve = ((1, 100.0), (4, 300.0), (16, 400.0))
    busy = worker(0, 30, batch_load=15, batch_throughput=curve)
    idle = worker(0, 30, batch_load=0, batch_throughput=curve)
    rtts = {nid(1): 0.01, nid(2): 0.01}
    assert hops(find_route({nid(1): busy, nid(2): idle}, 30, "m", rtts)) == [nid(2)]
    assert hops(find_route({nid(1): idle, nid(2): busy}, 30, "m", rtts)) == [nid(1)]
    linear = ((1, 100.0), (16, 1600.0))
    scaling = worker(0, 30, batch_load=3, batch_throughput=linear)
    alone = worker(0, 30, batch_load=0, batch_throughput=linear)
    assert find_route({nid(1): scaling}, 30, "m", rtts).expected_latency == pytest.approx(
        find_route({nid(1): alone}, 30, "m", rtts).expected_latency
    )
