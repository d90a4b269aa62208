"""``SwarmMonitor``: what the monitor page shows, polled from the swarm by this server.

Every ``interval`` seconds, while someone watches (``snapshot()`` was asked
for within ``watch_time`` seconds: a polled DHT costs the reactor a lookup and
signature checks per block, which generations would pay for), it reads the
model's block records from the DHT
(``MeshClient.block_records``) and asks each announced worker ``infer.info``
over the client's endpoint: the answer gives its open sessions and free cache
tokens now, its round trip time gives the RTT; a worker that does not answer
within ``ping_timeout`` is unreachable (its records stay in the DHT until they
expire, so only the ping tells a killed worker apart). ``swarm_snapshot`` is
the pure part: per model, the coverage of each block by serving workers, the
gaps, and one row per worker; ``/api/swarm`` serves it as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from meshnode.errors import MeshError
from meshnode.identity import PeerAddress
from meshnode.inference import messages
from meshnode.inference.records import ServerInfo, WorkerState

#: seconds between two polls of the swarm
REFRESH_INTERVAL = 2.0
#: seconds a worker has to answer ``infer.info`` before it counts as unreachable
PING_TIMEOUT = 2.0
#: seconds the monitor keeps polling after the last ``snapshot()``
WATCH_TIME = 30.0


@dataclass
class WorkerView:
    """One worker as this server last saw it."""

    node_id: bytes
    info: ServerInfo
    reachable: bool = False
    rtt: float | None = None
    sessions: int | None = None
    cache_tokens: int | None = None
    last_seen: float | None = None  # reactor time of its last answer

    @property
    def serving(self) -> bool:
        return self.reachable and self.info.state is WorkerState.ONLINE

    def state(self) -> str:
        if self.info.state is not WorkerState.ONLINE:
            return self.info.state.value
        return "serving" if self.reachable else "unreachable"


def swarm_snapshot(model_id: str, num_blocks: int, workers: list[WorkerView],
                   now: float, polled: float | None) -> dict[str, Any]:
    """The JSON of ``/api/swarm`` for one model."""
    coverage = [0] * num_blocks
    for worker in workers:
        if worker.serving:
            for block in range(worker.info.span.start, min(worker.info.span.end, num_blocks)):
                coverage[block] += 1
    rows = [_row(w, now) for w in sorted(workers, key=lambda w: (w.info.span, w.node_id))]
    model = {
        "id": model_id,
        "num_blocks": num_blocks,
        "coverage": coverage,
        "gaps": gaps(coverage),
        "complete": all(coverage),
        "workers": rows,
    }
    return {"models": [model], "polled_ago_s": None if polled is None else now - polled}


def gaps(coverage: list[int]) -> list[list[int]]:
    """Runs of blocks no serving worker covers, as ``[start, end)`` pairs."""
    out: list[list[int]] = []
    for block, count in enumerate(coverage):
        if count:
            continue
        if out and out[-1][1] == block:
            out[-1][1] = block + 1
        else:
            out.append([block, block + 1])
    return out


def _row(worker: WorkerView, now: float) -> dict[str, Any]:
    info = worker.info
    return {
        "id": worker.node_id.hex(),
        "address": info.address,
        "span": [info.span.start, info.span.end],
        "state": worker.state(),
        "serving": worker.serving,
        "reachable": worker.reachable,
        "rtt_ms": None if worker.rtt is None else round(worker.rtt * 1000, 2),
        "throughput": round(info.throughput, 2),
        "cache_tokens": worker.cache_tokens if worker.cache_tokens is not None
        else info.cache_tokens,
        "sessions": worker.sessions,
        "last_seen_ago_s": None if worker.last_seen is None else round(now - worker.last_seen, 1),
        "dtype": info.dtype,
    }


class SwarmMonitor:
    """Polls the swarm for one model; ``snapshot()`` is the last state seen."""

    log = Logger()

    def __init__(self, client: Any, reactor: Any, model_id: str,
                 interval: float = REFRESH_INTERVAL, ping_timeout: float = PING_TIMEOUT,
                 watch_time: float = WATCH_TIME):
        self._client = client
        self._reactor = reactor
        self._model_id = model_id
        self._interval = interval
        self._ping_timeout = ping_timeout
        self._watch_time = watch_time
        self._watched_until = float("-inf")
        self._workers: dict[bytes, WorkerView] = {}
        self._polled: float | None = None
        self._loop = LoopingCall(self._poll)
        self._loop.clock = reactor
        self._running: Deferred | None = None

    def start(self) -> None:
        self._running = self._loop.start(self._interval, now=True)
        self._running.addErrback(lambda f: self.log.failure("swarm monitor stopped", f))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def snapshot(self) -> dict[str, Any]:
        """The swarm as last polled; asking keeps the polls going for ``watch_time``."""
        self._watched_until = self._reactor.seconds() + self._watch_time
        layers = self._client.source.config.num_layers
        return swarm_snapshot(self._model_id, layers, list(self._workers.values()),
                              self._reactor.seconds(), self._polled)

    def _poll(self) -> Deferred[None] | None:
        if self._reactor.seconds() > self._watched_until:
            return None  # nobody watches: leave the reactor to the generations
        d = Deferred.fromCoroutine(self._refresh())
        # one failed poll (a DHT lookup timing out) must not stop the monitor
        return d.addErrback(lambda f: self.log.warn("swarm poll failed: {e}",
                                                    e=f.getErrorMessage()))

    async def _refresh(self) -> None:
        records = await self._client.block_records()
        announced: dict[bytes, ServerInfo] = {}
        for per_block in records.values():
            for node_id, info in per_block.items():
                announced.setdefault(node_id, info)
        for node_id in list(self._workers):
            if node_id not in announced:
                del self._workers[node_id]  # its records expired: it is gone
        for node_id, info in announced.items():
            view = self._workers.setdefault(node_id, WorkerView(node_id, info))
            view.info = info
        ids = list(announced)
        await DeferredList([Deferred.fromCoroutine(self._ping(self._workers[n])) for n in ids],
                           consumeErrors=True)
        self._polled = self._reactor.seconds()

    async def _ping(self, view: WorkerView) -> None:
        began = self._reactor.seconds()
        try:
            reply = await self._client.endpoint.request(
                PeerAddress.parse(view.info.address), messages.build_info(),
                timeout=self._ping_timeout)
        except (MeshError, ConnectError, OSError):  # no answer: unreachable from here, now
            view.reachable, view.rtt, view.sessions = False, None, None
            return
        now = self._reactor.seconds()
        view.reachable, view.rtt, view.last_seen = True, now - began, now
        fields = reply.fields
        view.sessions = fields.get("sessions") if isinstance(fields.get("sessions"), int) else None
        cache = fields.get("cache_tokens")
        view.cache_tokens = cache if isinstance(cache, int) else None
