"""A worker's links to its neighbours in routes: round trips measured and published.

Once steps are forwarded from worker to worker, the link between two
consecutive hops is on every token's critical path, and only its two ends can
measure it. Each worker therefore measures its round trip to the workers that
can come right before or right after it in a route (those serving the block
before its span, and the block at its end), and publishes them in its records
(``ServerInfo.peer_rtts``), which ``meshnode.client.routing.costs`` reads.

- ``PeerRtts`` (pure, clock injected): a smoothed round trip per peer
  (``srtt = (1 - SMOOTHING) * srtt + SMOOTHING * sample``, as TCP's), and the
  bounded map to publish: the ``MAX_PEER_RTTS`` most recently measured, by
  node-id prefix. Other parts of the worker that time a request to a peer
  (forwarding) may ``observe`` it too.
- ``LinkProber``: every ``interval`` seconds, reads the neighbours' records
  from the DHT and pings (``infer.info``) those measured longest ago, at most
  ``MAX_PEER_RTTS`` a round; after a round that measured a peer for the first
  time it calls ``on_new_peers`` (the worker re-announces then, rather than at
  its next refresh). Started in ``start()``, stopped in ``stop()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from meshnode.identity import NodeID, PeerAddress
from meshnode.inference import messages
from meshnode.inference.directory import fetch_block_records
from meshnode.inference.records import MAX_PEER_RTTS, PEER_PREFIX_BYTES, BlockSpan

#: weight of a new sample in the smoothed round trip
SMOOTHING = 0.25
#: seconds between two probing rounds
PROBE_INTERVAL = 20.0
#: seconds a ping may take before the peer counts as unmeasured this round
PROBE_TIMEOUT = 5.0


class PeerRtts:
    """Smoothed round trips (seconds) to peers, and when each was last measured."""

    def __init__(self, clock: Any, limit: int = MAX_PEER_RTTS):
        self._clock = clock
        self._limit = limit
        self._rtts: dict[NodeID, tuple[float, float]] = {}  # node id -> (srtt, measured at)

    def observe(self, node_id: NodeID, rtt: float) -> None:
        previous = self._rtts.get(node_id)
        smoothed = rtt if previous is None else (1 - SMOOTHING) * previous[0] + SMOOTHING * rtt
        self._rtts[node_id] = (smoothed, self._clock.seconds())
        if len(self._rtts) > 4 * self._limit:  # forget the stalest: the table stays bounded
            for stale in self.stalest(len(self._rtts) - 4 * self._limit):
                del self._rtts[stale]

    def get(self, node_id: NodeID) -> float | None:
        found = self._rtts.get(node_id)
        return None if found is None else found[0]

    def stalest(self, count: int, among: list[NodeID] | None = None) -> list[NodeID]:
        """Up to ``count`` of ``among`` (default: all known), never measured first, then the
        longest ago."""
        pool = list(self._rtts) if among is None else among
        return sorted(pool, key=lambda n: (self._rtts.get(n, (0.0, -1.0))[1], n))[:count]

    def published(self) -> tuple[tuple[bytes, float], ...]:
        """The ``limit`` most recently measured, as ``ServerInfo.peer_rtts``."""
        recent = sorted(self._rtts.items(), key=lambda item: -item[1][1])[: self._limit]
        return tuple(sorted((n[:PEER_PREFIX_BYTES], srtt) for n, (srtt, _) in recent))


def neighbour_blocks(span: BlockSpan, num_layers: int) -> list[int]:
    """The blocks whose workers can come right before or right after ``span`` in a route."""
    return [b for b in (span.start - 1, span.end) if 0 <= b < num_layers]


class LinkProber:
    """Measures this worker's round trips to its neighbours into a ``PeerRtts``."""

    log = Logger()

    def __init__(
        self,
        dht: Any,
        endpoint: Any,
        clock: Any,
        key_for: Callable[[int], bytes],
        span: BlockSpan,
        num_layers: int,
        rtts: PeerRtts,
        interval: float = PROBE_INTERVAL,
        on_new_peers: Callable[[], None] = lambda: None,
    ):
        self._dht = dht
        self._on_new_peers = on_new_peers
        self._endpoint = endpoint
        self._clock = clock
        self._key_for = key_for
        self._blocks = neighbour_blocks(span, num_layers)
        self.rtts = rtts
        self._loop = LoopingCall(self._round)
        self._loop.clock = clock
        self._interval = interval
        self._pending: Deferred | None = None

    def start(self) -> None:
        if self._blocks:
            self._loop.start(self._interval, now=True).addErrback(
                lambda failure: self.log.failure("link probing stopped", failure)
            )

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._pending is not None:
            self._pending.cancel()

    def probe(self) -> Deferred[None]:
        """One round: the neighbours' records, then a ping to the stalest of them."""
        return Deferred.fromCoroutine(self._probe())

    def _round(self) -> None:
        if self._pending is not None:
            return  # the previous round is still in flight
        pending = self._pending = self.probe()
        pending.addErrback(lambda failure: self.log.failure("link probe failed", failure))
        pending.addBoth(lambda _: setattr(self, "_pending", None))

    async def _probe(self) -> None:
        blocks = self._blocks
        found = await fetch_block_records(self._dht, lambda i: self._key_for(blocks[i]),
                                          len(blocks))
        own = self._endpoint.identity.node_id
        peers = {n: info for by_worker in found.values() for n, info in by_worker.items()
                 if n != own and info.online}
        chosen = self.rtts.stalest(MAX_PEER_RTTS, among=sorted(peers))
        new = [n for n in chosen if self.rtts.get(n) is None]
        pings = [Deferred.fromCoroutine(self._ping(n, peers[n].address)) for n in chosen]
        await DeferredList(pings, consumeErrors=True)
        if any(self.rtts.get(n) is not None for n in new):
            self._on_new_peers()

    async def _ping(self, node_id: NodeID, address: str) -> None:
        """Time an ``infer.info``; a first one that had to dial (TLS handshake included) is
        not a sample: the second is."""
        dialled = self._endpoint.stats_for(node_id) is None
        for _ in range(2 if dialled else 1):
            began = self._clock.seconds()
            await self._endpoint.request(PeerAddress.parse(address), messages.build_info(),
                                         timeout=PROBE_TIMEOUT)
        self.rtts.observe(node_id, self._clock.seconds() - began)
