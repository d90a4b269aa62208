"""``find_route``: cover blocks ``[0, n)`` with spans of live workers at least expected latency.

Pure, as Petals' routing: a graph whose nodes are block boundaries ``0..n``;
a worker serving ``[a, b)`` gives an edge ``i -> j`` for every
``a <= i < j <= b`` (it may compute any part of its span), weighted by

    rtt(worker) + tokens * (j - i) / (throughput * (b - a))

(its round trip, plus its announced speed over the blocks used), and Dijkstra
finds the cheapest path from 0 to ``n``. Workers of another model fingerprint,
offline, banned, unreachable, accepting fewer positions than the session
needs or without room for its cache now are skipped; when no path exists,
``RouteNotFound.missing`` names the blocks nobody usable serves and its
message says why each candidate for them was left out (``left_out``,
``no_route_message``). Spans are written ``A:B`` (end exclusive) in every
message, as ``--blocks`` takes them.
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


#: why a candidate worker was left out of a route (the words of the messages)
LENGTH, CAPACITY, BANNED, UNREACHABLE = "length", "capacity", "banned", "unreachable"


def left_out(
    node_id: NodeID,
    info: ServerInfo,
    length: int,
    banned: Collection[NodeID] = (),
    unreachable: Collection[NodeID] = (),
) -> str | None:
    """Why an eligible worker (online, this model) cannot take a session of ``length``
    positions now: ``LENGTH``, ``CAPACITY``, ``BANNED``, ``UNREACHABLE``; None if it can."""
    if node_id in banned:
        return BANNED
    if node_id in unreachable:
        return UNREACHABLE
    if info.max_length is not None and info.max_length < length:
        return LENGTH
    if info.cache_tokens < length:
        return CAPACITY
    return None


def find_route(
    workers: Mapping[NodeID, ServerInfo],
    num_layers: int,
    model: str,
    rtts: Mapping[NodeID, float] | None = None,
    banned: Collection[NodeID] = (),
    tokens: int = 1,
    min_cache_tokens: int = 0,
    unreachable: Collection[NodeID] = (),
) -> Route:
    """The least expected-latency chain of workers covering ``[0, num_layers)``.

    ``min_cache_tokens``: the positions the session needs (its max length).
    """
    rtts = rtts or {}
    candidates = {n: i for n, i in workers.items() if eligible(i, model, num_layers)}
    usable = {
        node_id: info
        for node_id, info in candidates.items()
        if left_out(node_id, info, min_cache_tokens, banned, unreachable) is None
    }
    _check_coverage(usable, candidates, num_layers, min_cache_tokens, banned, unreachable)
    edges = _edges(usable, num_layers, rtts, tokens)
    return _dijkstra(edges, usable, num_layers)


def span_route(
    workers: Mapping[NodeID, ServerInfo],
    span: BlockSpan,
    model: str,
    rtts: Mapping[NodeID, float] | None = None,
    banned: Collection[NodeID] = (),
    min_cache_tokens: int = 0,
    unreachable: Collection[NodeID] = (),
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
            clipped, span.length, model, rtts=rtts, banned=banned,
            min_cache_tokens=min_cache_tokens, unreachable=unreachable,
        )
    except RouteNotFound as exc:
        missing = tuple(block + span.start for block in exc.missing)
        candidates = {n: workers[n] for n in clipped if eligible(workers[n], model)}
        message = no_route_message(
            candidates, missing, min_cache_tokens, banned, unreachable
        )
        raise RouteNotFound(message, missing) from None
    hops = tuple(
        RouteHop(
            hop.node_id,
            workers[hop.node_id],
            BlockSpan(hop.span.start + span.start, hop.span.end + span.start),
        )
        for hop in relative.hops
    )
    return Route(hops, relative.expected_latency)


def _check_coverage(
    usable: Mapping[NodeID, ServerInfo],
    candidates: Mapping[NodeID, ServerInfo],
    num_layers: int,
    length: int,
    banned: Collection[NodeID],
    unreachable: Collection[NodeID],
) -> None:
    covered = set()
    for info in usable.values():
        covered.update(info.span.blocks())
    missing = tuple(b for b in range(num_layers) if b not in covered)
    if missing:
        message = no_route_message(candidates, missing, length, banned, unreachable)
        raise RouteNotFound(message, missing)


def no_route_message(
    candidates: Mapping[NodeID, ServerInfo],
    missing: tuple[int, ...],
    length: int,
    banned: Collection[NodeID] = (),
    unreachable: Collection[NodeID] = (),
) -> str:
    """Why nobody serves ``missing`` for a session of ``length`` positions, in words.

    ``candidates``: the eligible workers (online, this model) known. One reason
    for all of them gets one sentence (no worker accepts that many positions;
    no free cache now, retry later); several reasons list each candidate.
    """
    blocks = span_text(missing)
    wanted = set(missing)
    reasons = {
        node_id: left_out(node_id, info, length, banned, unreachable)
        for node_id, info in candidates.items()
        if wanted.intersection(info.span.blocks())
    }
    reasons = {n: r for n, r in reasons.items() if r is not None}
    if not reasons:
        return f"no worker serves blocks {blocks}"
    kinds = set(reasons.values())
    if kinds == {LENGTH}:
        longest = max(candidates[n].max_length or 0 for n in reasons)
        return (
            f"the session needs {length} positions and no worker of blocks {blocks} "
            f"accepts more than {longest}"
        )
    if kinds == {CAPACITY}:
        most = max(candidates[n].cache_tokens for n in reasons)
        return (
            f"the workers of blocks {blocks} have no free cache now for {length} positions "
            f"(the most free is {most} tokens): retry later"
        )
    details = "; ".join(
        f"{n.hex()[:12]} (blocks {candidates[n].span}): {_reason_text(candidates[n], r, length)}"
        for n, r in sorted(reasons.items(), key=lambda kv: (candidates[kv[0]].span, kv[0]))
    )
    return f"no usable worker serves blocks {blocks}: {details}"


def _reason_text(info: ServerInfo, reason: str, length: int) -> str:
    if reason == LENGTH:
        return f"accepts at most {info.max_length} positions, {length} needed"
    if reason == CAPACITY:
        return f"no free cache now ({info.cache_tokens} tokens free, {length} needed)"
    if reason == UNREACHABLE:
        return "does not answer"
    return "banned after failing"


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


def span_text(blocks: Collection[int]) -> str:
    """Blocks as spans, the way ``--blocks`` writes them: ``(0, 1, 2, 5)`` -> ``"0:3, 5:6"``."""
    runs: list[list[int]] = []
    for block in sorted(blocks):
        if runs and runs[-1][1] == block:
            runs[-1][1] = block + 1
        else:
            runs.append([block, block + 1])
    return ", ".join(f"{a}:{b}" for a, b in runs)
