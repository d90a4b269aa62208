"""Route choice: Dijkstra over spans, minimising round trips plus compute time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.client.routing.route import candidates_from_records, find_route
from meshnode.errors import RouteNotFound
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState


def worker(start, end, throughput=100.0, model="m", online=True, cache=1000) -> ServerInfo:
    return ServerInfo(
        address=f"127.0.0.1:{start}{end}",
        span=BlockSpan(start, end),
        state=WorkerState.ONLINE if online else WorkerState.OFFLINE,
        throughput=throughput,
        cache_tokens=cache,
        dtype="float32",
        model=model,
    )


def nid(n: int) -> bytes:
    return bytes([n]) * 32


def covered(route, n):
    blocks = [b for hop in route.hops for b in hop.span.blocks()]
    return blocks == list(range(n))


def test_three_disjoint_workers():
    """When three workers split the model, then the route goes through all three in order."""
    workers = {nid(1): worker(0, 10), nid(2): worker(10, 20), nid(3): worker(20, 30)}
    route = find_route(workers, 30, "m")
    assert [h.node_id for h in route.hops] == [nid(1), nid(2), nid(3)]
    assert covered(route, 30)


def test_prefers_one_hop_when_rtt_dominates():
    """When one worker serves everything, then it beats three hops of the same speed."""
    workers = {nid(1): worker(0, 30), nid(2): worker(0, 10), nid(3): worker(10, 30)}
    route = find_route(workers, 30, "m", rtts={nid(1): 0.01, nid(2): 0.01, nid(3): 0.01})
    assert [h.node_id for h in route.hops] == [nid(1)]


def test_slow_worker_avoided_and_rtt_counts():
    """When a worker is slow or far, then the router takes the faster/nearer alternative."""
    workers = {nid(1): worker(0, 30, throughput=1.0), nid(2): worker(0, 30, throughput=100.0)}
    assert find_route(workers, 30, "m").hops[0].node_id == nid(2)
    rtts = {nid(1): 0.001, nid(2): 5.0}
    workers = {nid(1): worker(0, 30), nid(2): worker(0, 30)}
    assert find_route(workers, 30, "m", rtts=rtts).hops[0].node_id == nid(1)


def test_overlapping_spans_use_sub_spans():
    """When spans overlap, then the second hop starts where the first stopped."""
    workers = {nid(1): worker(0, 12), nid(2): worker(10, 30)}
    route = find_route(workers, 30, "m")
    assert covered(route, 30) and len(route.hops) == 2


def test_skips_model_state_banned_and_full():
    """When workers are of another model, offline, banned or full, then they are not used."""
    workers = {
        nid(1): worker(0, 30, model="other"),
        nid(2): worker(0, 30, online=False),
        nid(3): worker(0, 30),
        nid(4): worker(0, 30, cache=10),
        nid(5): worker(0, 30, throughput=1.0),
    }
    route = find_route(workers, 30, "m", banned={nid(3)}, min_cache_tokens=100)
    assert route.hops[0].node_id == nid(5)


def test_missing_blocks_named():
    """When blocks 10-14 have no eligible worker, then RouteNotFound names exactly them."""
    workers = {nid(1): worker(0, 10), nid(2): worker(15, 30), nid(3): worker(10, 15, model="x")}
    with pytest.raises(RouteNotFound) as info:
        find_route(workers, 30, "m")
    assert info.value.missing == tuple(range(10, 15))
    assert "10-14" in str(info.value)


def test_candidates_merge_per_block_records():
    """When a worker appears under many blocks, then it is one candidate."""
    a, b = worker(0, 2), worker(2, 3)
    records = {0: {nid(1): a}, 1: {nid(1): a}, 2: {nid(2): b}}
    assert candidates_from_records(records) == {nid(1): a, nid(2): b}


spans = st.lists(
    st.tuples(st.integers(0, 11), st.integers(1, 12), st.floats(0.1, 1000), st.floats(0, 1)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(spans)
def test_route_covers_or_names_missing(raw):
    """For any set of spans, then the route covers [0, n) in order, or names what is missing."""
    workers = {}
    rtts = {}
    for n, (a, b, tput, rtt) in enumerate(raw):
        if a < b:
            workers[nid(n)] = worker(a, b, throughput=tput)
            rtts[nid(n)] = rtt
    served = {blk for w in workers.values() for blk in w.span.blocks()}
    try:
        route = find_route(workers, 12, "m", rtts=rtts)
    except RouteNotFound as exc:
        assert set(exc.missing) == set(range(12)) - served and exc.missing
    else:
        assert covered(route, 12)
        for hop in route.hops:
            assert hop.info.span.contains(hop.span)
