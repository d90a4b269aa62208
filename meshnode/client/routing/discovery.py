"""Finding candidate workers: their DHT records and measured round trips.

The async half of routing (the pure half is ``route``): fetch every block's
records, keep the valid ones whose announced address is pinned to the node id
that signed them, ping candidates with ``infer.info`` to measure round trips
(those that do not answer are left out), and hand all that to ``find_route``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger, LogLevel

from meshnode.client.routing.route import NodeID, Route, candidates_from_records, find_route
from meshnode.errors import MeshError
from meshnode.identity import PeerAddress
from meshnode.worker import messages
from meshnode.worker.records import ServerInfo

#: seconds to wait for a candidate's ping
PING_TIMEOUT = 5.0

log = Logger()


async def fetch_block_records(
    dht: Any, key_for: Callable[[int], bytes], num_layers: int
) -> dict[int, dict[NodeID, ServerInfo]]:
    """Per block, the valid server infos found in the DHT, by signer node id."""
    results = await DeferredList(
        [dht.get(key_for(b)) for b in range(num_layers)], consumeErrors=True
    )
    records: dict[int, dict[NodeID, ServerInfo]] = {}
    for block, (ok, found) in enumerate(results):
        if not ok:
            log.emit(
                LogLevel.warn,
                "DHT lookup of block {b} failed: {why}",
                b=block,
                why=found.getErrorMessage(),
            )
            continue
        records[block] = {
            node_id: info
            for node_id, record in found.items()
            if (info := _parse(node_id, record.value)) is not None
        }
    return records


def _parse(node_id: NodeID, value: Any) -> ServerInfo | None:
    try:
        info = ServerInfo.from_record(value)
        pinned = PeerAddress.parse(info.address).node_id
    except MeshError:
        return None
    return info if pinned == node_id else None


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
    key_for: Callable[[int], bytes],
    num_layers: int,
    model: str,
    banned: Collection[NodeID] = (),
    max_length: int = 0,
) -> Route:
    """Records -> online candidates -> measured RTTs -> the least-latency route."""
    records = await fetch_block_records(dht, key_for, num_layers)
    workers = {
        node_id: info
        for node_id, info in candidates_from_records(records).items()
        if node_id not in banned and info.online and info.model == model
    }
    rtts = await measure_rtts(endpoint, clock, workers)
    unreachable = set(workers) - set(rtts)
    return find_route(
        workers,
        num_layers,
        model,
        rtts=rtts,
        banned=set(banned) | unreachable,
        min_cache_tokens=max_length,
    )
