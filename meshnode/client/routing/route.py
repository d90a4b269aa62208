"""``find_route``: cover blocks ``[0, n)`` with spans of live workers at least expected latency.

Pure, as Petals' routing: a graph whose nodes are block boundaries ``0..n``;
a worker serving ``[a, b)`` gives an edge ``i -> j`` for every
``a <= i < j <= b`` (it may compute any part of its span), weighted by

    rtt(worker) + tokens * (j - i) / (throughput * (b - a))

(its round trip, plus its announced speed over the blocks used), and Dijkstra
finds the cheapest path from 0 to ``n``. Workers of another model fingerprint,
offline, banned, or without room for the session's cache are skipped; when no
path exists, ``RouteNotFound.missing`` names the blocks nobody eligible serves.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from meshnode.errors import RouteNotFound
from meshnode.inference.records import BlockSpan, ServerInfo, eligible

NodeID = bytes
#: round trip assumed for a worker not measured (seconds)
DEFAULT_RTT = 0.05
#: throughput assumed for a worker announcing none (tokens/s)
MIN_THROUGHPUT = 1e-3


@dataclass(frozen=True)
class RouteHop:
    """One worker of a route and the blocks it computes there (within its span)."""

    node_id: NodeID
    info: ServerInfo
    span: BlockSpan

    @property
    def address(self) -> str:
        return self.info.address


@dataclass(frozen=True)
class Route:
    hops: tuple[RouteHop, ...]
    expected_latency: float

    def describe(self) -> list[dict]:
        """Worker ids and spans, for ``--json`` and logs."""
        return [
            {"worker": hop.node_id.hex(), "span": [hop.span.start, hop.span.end]}
            for hop in self.hops
        ]


def candidates_from_records(
    records: Mapping[int, Mapping[NodeID, ServerInfo]],
) -> dict[NodeID, ServerInfo]:
    """One ``ServerInfo`` per worker from per-block records (the lowest block's wins)."""
    workers: dict[NodeID, ServerInfo] = {}
    for block in sorted(records):
        for node_id, info in records[block].items():
            workers.setdefault(node_id, info)
    return workers


def find_route(
    workers: Mapping[NodeID, ServerInfo],
    num_layers: int,
    model: str,
    rtts: Mapping[NodeID, float] | None = None,
    banned: Collection[NodeID] = (),
    tokens: int = 1,
    min_cache_tokens: int = 0,
) -> Route:
    """The least expected-latency chain of workers covering ``[0, num_layers)``."""
    rtts = rtts or {}
    usable = {
        node_id: info
        for node_id, info in workers.items()
        if node_id not in banned and eligible(info, model, num_layers, min_cache_tokens)
    }
    _check_coverage(usable, num_layers)
    edges = _edges(usable, num_layers, rtts, tokens)
    return _dijkstra(edges, usable, num_layers)


def span_route(
    workers: Mapping[NodeID, ServerInfo],
    span: BlockSpan,
    model: str,
    rtts: Mapping[NodeID, float] | None = None,
    banned: Collection[NodeID] = (),
    min_cache_tokens: int = 0,
) -> Route:
    """The least-latency chain covering exactly ``span`` (``RouteNotFound`` with absolute
    ``missing`` blocks otherwise).

    Each worker's span is clipped to ``span`` and shifted to start at 0, its
    throughput scaled so the cost per block is unchanged, and ``find_route``
    runs on that; the hops are shifted back.
    """
    clipped: dict[NodeID, ServerInfo] = {}
    for node_id, info in workers.items():
        low, high = max(info.span.start, span.start), min(info.span.end, span.end)
        if low >= high:
            continue
        clipped[node_id] = dataclasses.replace(
            info,
            span=BlockSpan(low - span.start, high - span.start),
            throughput=info.throughput * (high - low) / info.span.length,
        )
    try:
        relative = find_route(
            clipped, span.length, model, rtts=rtts, banned=banned, min_cache_tokens=min_cache_tokens
        )
    except RouteNotFound as exc:
        missing = tuple(block + span.start for block in exc.missing)
        raise RouteNotFound(
            f"no eligible worker serves blocks {_ranges(missing)}", missing
        ) from None
    hops = tuple(
        RouteHop(
            hop.node_id,
            workers[hop.node_id],
            BlockSpan(hop.span.start + span.start, hop.span.end + span.start),
        )
        for hop in relative.hops
    )
    return Route(hops, relative.expected_latency)


def _check_coverage(usable: Mapping[NodeID, ServerInfo], num_layers: int) -> None:
    covered = set()
    for info in usable.values():
        covered.update(info.span.blocks())
    missing = tuple(b for b in range(num_layers) if b not in covered)
    if missing:
        raise RouteNotFound(f"no eligible worker serves blocks {_ranges(missing)}", missing)


def _edges(
    usable: Mapping[NodeID, ServerInfo],
    num_layers: int,
    rtts: Mapping[NodeID, float],
    tokens: int,
) -> list[list[tuple[float, int, NodeID]]]:
    """``edges[i]`` lists ``(cost, j, worker)`` for every hop starting at block ``i``."""
    edges: list[list[tuple[float, int, NodeID]]] = [[] for _ in range(num_layers)]
    for node_id, info in usable.items():
        span = info.span
        per_block = tokens / (max(info.throughput, MIN_THROUGHPUT) * span.length)
        rtt = rtts.get(node_id, DEFAULT_RTT)
        for i in span.blocks():
            for j in range(i + 1, span.end + 1):
                edges[i].append((rtt + per_block * (j - i), j, node_id))
    return edges


def _dijkstra(
    edges: list[list[tuple[float, int, NodeID]]],
    usable: Mapping[NodeID, ServerInfo],
    num_layers: int,
) -> Route:
    best: dict[int, float] = {0: 0.0}
    came_from: dict[int, tuple[int, NodeID]] = {}
    heap: list[tuple[float, int]] = [(0.0, 0)]
    while heap:
        cost, i = heapq.heappop(heap)
        if i == num_layers:
            break
        if cost > best.get(i, float("inf")):
            continue
        for edge_cost, j, node_id in sorted(edges[i], key=lambda e: (e[0], e[2])):
            total = cost + edge_cost
            if total < best.get(j, float("inf")):
                best[j] = total
                came_from[j] = (i, node_id)
                heapq.heappush(heap, (total, j))
    hops = []
    j = num_layers
    while j != 0:
        i, node_id = came_from[j]
        hops.append(RouteHop(node_id, usable[node_id], BlockSpan(i, j)))
        j = i
    return Route(tuple(reversed(hops)), best[num_layers])


def _ranges(blocks: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and runs[-1][1] == block - 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
