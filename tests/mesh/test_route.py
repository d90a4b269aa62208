"""Route choice: Dijkstra over spans, minimising round trips plus compute time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.client.routing.route import (
    candidates_from_records,
    find_route,
    span_route,
    span_text,
)
from meshnode.errors import RouteNotFound
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState


def worker(
    start, end, throughput=100.0, model="m", online=True, cache=1000, max_length=None
) -> ServerInfo:
    return ServerInfo(
        address=f"127.0.0.1:{start}{end}",
        span=BlockSpan(start, end),
        state=WorkerState.ONLINE if online else WorkerState.OFFLINE,
        throughput=throughput,
        cache_tokens=cache,
        dtype="float32",
        model=model,
        max_length=max_length,
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
    assert "blocks 10:15" in str(info.value)


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


def test_spans_are_written_as_blocks_takes_them():
    """When blocks are named in a message, then they read as --blocks spans, end exclusive."""
    assert span_text((0, 1, 2, 5)) == "0:3, 5:6"
    assert span_text(range(15, 30)) == "15:30"


def test_no_worker_accepts_the_length():
    """When every worker of a span accepts at most 256 positions and the session needs 1064,
    then the error says so, with the largest max length, not that nobody serves the blocks."""
    workers = {nid(1): worker(0, 15, cache=5000), nid(2): worker(15, 30, max_length=256),
               nid(3): worker(15, 30, max_length=128)}
    with pytest.raises(RouteNotFound) as info:
        find_route(workers, 30, "m", min_cache_tokens=1064)
    assert str(info.value) == (
        "the session needs 1064 positions and no worker of blocks 15:30 accepts more than 256"
    )
    assert info.value.missing == tuple(range(15, 30))


def test_no_free_cache_says_retry_later():
    """When both workers of a span are up but their caches are taken, then the error says
    they have no free cache now and to retry later."""
    workers = {nid(1): worker(0, 15), nid(2): worker(15, 30, cache=10),
               nid(3): worker(15, 30, cache=40)}
    with pytest.raises(RouteNotFound) as info:
        find_route(workers, 30, "m", min_cache_tokens=100)
    message = str(info.value)
    assert "workers of blocks 15:30 have no free cache now" in message
    assert "the most free is 40 tokens" in message and "retry later" in message


def test_mixed_reasons_name_each_candidate():
    """When the candidates of a span are left out for different reasons, then the error
    names each one with its reason (length, capacity, banned, unreachable)."""
    workers = {nid(1): worker(0, 6), nid(2): worker(6, 12, max_length=16),
               nid(3): worker(6, 12, cache=1), nid(4): worker(6, 12), nid(5): worker(6, 12)}
    with pytest.raises(RouteNotFound) as info:
        span_route(workers, BlockSpan(0, 12), "m", banned={nid(4)}, unreachable={nid(5)},
                   min_cache_tokens=64)
    message = str(info.value)
    assert message.startswith("no usable worker serves blocks 6:12: ")
    assert f"{nid(2).hex()[:12]} (blocks 6:12): accepts at most 16 positions, 64 needed" in message
    assert f"{nid(3).hex()[:12]} (blocks 6:12): no free cache now" in message
    assert f"{nid(4).hex()[:12]} (blocks 6:12): banned" in message
    assert f"{nid(5).hex()[:12]} (blocks 6:12): does not answer" in message
    assert nid(1).hex()[:12] not in message


def test_old_records_without_max_length_are_not_left_out_for_length():
    """When a worker's record has no max length (an older worker), then length does not
    exclude it."""
    route = find_route({nid(1): worker(0, 30)}, 30, "m", min_cache_tokens=900)
    assert [h.node_id for h in route.hops] == [nid(1)]
