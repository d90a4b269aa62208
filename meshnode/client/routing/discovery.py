"""Finding a route now: the workers' DHT records, their measured round trips, the best chain.

The async half of routing (the pure half is ``route``): fetch the records of
the blocks to cover (``meshnode.inference.directory``), keep the eligible
workers, ping those not banned with ``infer.info`` to measure round trips
(those that do not answer are unreachable), and hand all that to
``span_route`` (the whole model, or one span for recovery), which says why
each candidate was left out when no route exists.
This is the one discovery path: ``MeshClient`` and ``SpanRecovery`` both use
it, and ``wait_for_route`` is the one poll loop over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater

from meshnode.client.routing.route import (
    NodeID,
    Route,
    candidates_from_records,
    eligible,
    span_route,
)
from meshnode.errors import RouteNotFound
from meshnode.identity import PeerAddress
from meshnode.inference import messages
from meshnode.inference.directory import KeyFor, fetch_block_records
from meshnode.inference.records import BlockSpan, ServerInfo

#: seconds to wait for a candidate's ping
PING_TIMEOUT = 5.0
#: seconds between two route lookups while waiting for the mesh to cover the blocks
ROUTE_POLL_INTERVAL = 0.5


async def measure_rtts(
    endpoint: Any, clock: Any, workers: dict[NodeID, ServerInfo], timeout: float = PING_TIMEOUT
) -> dict[NodeID, float]:
    """Round trip of an ``infer.info`` to each worker; those that fail are absent."""

    def ping(info: ServerInfo) -> Deferred[float]:
        began = clock.seconds()
        d = endpoint.request(
            PeerAddress.parse(info.address), messages.build_info(), timeout=timeout
        )
        return d.addCallback(lambda _: clock.seconds() - began)

    node_ids = list(workers)
    results = await DeferredList([ping(workers[n]) for n in node_ids], consumeErrors=True)
    return {n: rtt for n, (ok, rtt) in zip(node_ids, results) if ok}


async def discover_route(
    dht: Any,
    endpoint: Any,
    clock: Any,
    key_for: KeyFor,
    span: BlockSpan,
    model: str,
    banned: Collection[NodeID] = (),
    max_length: int = 0,
    throughputs: Mapping[NodeID, float] | None = None,
    forwarding: bool = False,
) -> Route:
    """Records of ``span``'s blocks -> eligible, reachable candidates -> the least-latency route.

    ``span`` is the whole model for a new generation, or the span of a failed
    hop for recovery; either way the route covers exactly its blocks.
    ``throughputs``: speeds the client measured itself (``meshnode.client.verify``),
    used instead of what those workers announce. ``forwarding``: steps will pass
    from worker to worker, so the links between consecutive hops count
    (``meshnode.client.routing.costs``).
    """
    found = await fetch_block_records(dht, lambda i: key_for(span.start + i), span.length)
    records = {span.start + i: by_worker for i, by_worker in found.items()}
    workers = {
        node_id: info
        for node_id, info in candidates_from_records(records).items()
        if eligible(info, model)
    }
    for node_id, measured in (throughputs or {}).items():
        if node_id in workers:
            workers[node_id] = dataclasses.replace(workers[node_id], throughput=measured)
    to_ping = {n: info for n, info in workers.items() if n not in banned}
    rtts = await measure_rtts(endpoint, clock, to_ping)
    unreachable = set(to_ping) - set(rtts)
    return span_route(
        workers, span, model, rtts, banned=banned, min_cache_tokens=max_length,
        unreachable=unreachable, forwarding=forwarding,
    )


async def wait_for_route(
    discover: Callable[[], Awaitable[Route]],
    clock: Any,
    deadline: float,
    poll_interval: float = ROUTE_POLL_INTERVAL,
) -> Route:
    """``discover()`` until it finds a route, or its ``RouteNotFound`` once ``deadline`` passed."""
    while True:
        try:
            return await discover()
        except RouteNotFound:
            if clock.seconds() >= deadline:
                raise
        await deferLater(clock, poll_interval, lambda: None)
