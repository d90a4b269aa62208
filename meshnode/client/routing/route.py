"""``find_route``: cover blocks ``[0, n)`` with spans of live workers at least expected latency.

Pure, as Petals' routing: Dijkstra over block boundaries ``0..n``; a worker
serving ``[a, b)`` may take a route from ``i`` to ``j`` for every
``a <= i < j <= b`` (it may compute any part of its span), at the cost

    link + step_seconds(worker, tokens) * (j - i) / (b - a)

(``meshnode.client.routing.costs``: its compute at its announced load, over
the blocks used). The link depends on how steps travel. Client-driven, the
client calls each hop in turn: ``link = client_rtt(worker)``. Forwarded
(``forwarding=True``), the step goes client -> first -> ... -> last -> client:
the link is half the round trip from the previous hop (``client_rtt / 2`` for
the first, ``between(previous, worker) / 2`` after), and the last hop adds
``client_rtt(last) / 2`` for the answer; the state of the search is then the
block boundary *and* the worker that reached it. Workers of another model fingerprint,
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

from meshnode.client.routing.costs import LinkCosts, NodeID, step_seconds
from meshnode.errors import RouteNotFound
from meshnode.inference.records import BlockSpan, ServerInfo, eligible

#: the search's "previous hop" before the first one: the client
_CLIENT = b""


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
    forwarding: bool = False,
) -> Route:
    """The least expected-latency chain of workers covering ``[0, num_layers)``.

    ``min_cache_tokens``: the positions the session needs (its max length);
    ``forwarding``: steps pass from worker to worker, so the links between
    consecutive hops count (see the module docstring).
    """
    rtts = rtts or {}
    candidates = {n: i for n, i in workers.items() if eligible(i, model, num_layers)}
    usable = {
        node_id: info
        for node_id, info in candidates.items()
        if left_out(node_id, info, min_cache_tokens, banned, unreachable) is None
    }
    _check_coverage(usable, candidates, num_layers, min_cache_tokens, banned, unreachable)
    return _cheapest_chain(usable, num_layers, LinkCosts(rtts, workers), tokens, forwarding)


def span_route(
    workers: Mapping[NodeID, ServerInfo],
    span: BlockSpan,
    model: str,
    rtts: Mapping[NodeID, float] | None = None,
    banned: Collection[NodeID] = (),
    min_cache_tokens: int = 0,
    unreachable: Collection[NodeID] = (),
    forwarding: bool = False,
) -> Route:
    """The least-latency chain covering exactly ``span`` (``RouteNotFound`` with absolute
    ``missing`` blocks otherwise).

    Each worker's span is clipped to ``span`` and shifted to start at 0, its
    throughput scaled so the cost per block is unchanged, and ``find_route``
    runs on that; the hops are shifted back. With ``forwarding``, the ends of
    ``span`` count as the client's (a recovered span's neighbours are not
    weighed).
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
            min_cache_tokens=min_cache_tokens, unreachable=unreachable, forwarding=forwarding,
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


def _cheapest_chain(
    usable: Mapping[NodeID, ServerInfo],
    num_layers: int,
    links: LinkCosts,
    tokens: int,
    forwarding: bool,
) -> Route:
    """Dijkstra from block 0 to ``num_layers``; a state is ``(block, previous worker)`` when
    forwarding (the next link depends on it), the block alone otherwise."""
    by_start: list[list[NodeID]] = [[] for _ in range(num_layers)]
    per_block = {}
    for node_id, info in sorted(usable.items()):
        per_block[node_id] = step_seconds(info, tokens) / info.span.length
        for i in info.span.blocks():
            by_start[i].append(node_id)
    start = (0, _CLIENT)
    best: dict[tuple[int, NodeID], float] = {start: 0.0}
    came_from: dict[tuple[int, NodeID], tuple[tuple[int, NodeID], NodeID]] = {}
    heap: list[tuple[float, int, NodeID]] = [(0.0, 0, _CLIENT)]
    while heap:
        cost, i, previous = heapq.heappop(heap)
        if i == num_layers:
            break
        if cost > best.get((i, previous), float("inf")):
            continue
        for node_id in by_start[i]:
            if forwarding and node_id == previous:
                continue
            link = _link(links, previous, node_id, forwarding)
            for j in range(i + 1, usable[node_id].span.end + 1):
                total = cost + link + per_block[node_id] * (j - i)
                if forwarding and j == num_layers:
                    total += links.client(node_id) / 2  # the answer back to the client
                state = (j, node_id if forwarding else _CLIENT)
                if total < best.get(state, float("inf")):
                    best[state] = total
                    came_from[state] = ((i, previous), node_id)
                    heapq.heappush(heap, (total, *state))
    if i != num_layers:
        raise RouteNotFound("no chain of distinct workers covers the blocks", ())
    return _route_from(came_from, usable, (i, previous), cost)


def _link(links: LinkCosts, previous: NodeID, node_id: NodeID, forwarding: bool) -> float:
    """The cost of reaching ``node_id`` from the previous hop (the client: ``_CLIENT``)."""
    if not forwarding:
        return links.client(node_id)
    if previous == _CLIENT:
        return links.client(node_id) / 2
    return links.between(previous, node_id) / 2


def _route_from(
    came_from: Mapping[tuple[int, NodeID], tuple[tuple[int, NodeID], NodeID]],
    usable: Mapping[NodeID, ServerInfo],
    end: tuple[int, NodeID],
    cost: float,
) -> Route:
    hops = []
    state = end
    while state[0] != 0:
        (i, previous), node_id = came_from[state]
        hops.append(RouteHop(node_id, usable[node_id], BlockSpan(i, state[0])))
        state = (i, previous)
    return Route(tuple(reversed(hops)), cost)


def span_text(blocks: Collection[int]) -> str:
    """Blocks as spans, the way ``--blocks`` writes them: ``(0, 1, 2, 5)`` -> ``"0:3, 5:6"``."""
    runs: list[list[int]] = []
    for block in sorted(blocks):
        if runs and runs[-1][1] == block:
            runs[-1][1] = block + 1
        else:
            runs.append([block, block + 1])
    return ", ".join(f"{a}:{b}" for a, b in runs)
