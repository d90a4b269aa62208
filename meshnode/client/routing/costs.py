"""What one hop of a route costs: its compute at its announced load, and the links around it.

Pure functions over ``ServerInfo`` records, used by ``route.find_route``:

- ``step_seconds(info, tokens)``: how long a step of ``tokens`` positions of a
  new session takes through the worker's whole span. A worker that batches
  announces ``batch_throughput`` (tokens/s through its span when ``B`` steps
  share a forward) and ``batch_load`` (the steps it runs now); a new step
  joins a batch of ``load + 1`` rows, and each row advances at ``T(B) / B``
  tokens/s, so the step takes ``tokens * B / T(B)``. ``T`` is interpolated
  linearly between the announced points and held flat past the last one (a
  saturated worker gains nothing from a larger batch). The curve gives the
  shape, ``throughput`` the level: the curve is scaled so ``T(1)`` equals
  ``throughput``, which is what the client replaces by its own measurement of
  a worker (``meshnode.client.verify``). No curve: ``T(B) = throughput`` for
  every ``B`` (a worker that runs one step at a time); no load: 0.
- ``LinkCosts``: the round trips around a hop. ``client(w)`` is the client's
  measured round trip to ``w`` (``DEFAULT_RTT`` when not measured).
  ``between(a, b)`` is the round trip of the link ``a -> b``: the one ``a`` or
  ``b`` published (``ServerInfo.peer_rtts``; the mean when both did), else an
  estimate from the client's own round trips to both ends, their mean (exact
  when the client sits as far from each as they sit from each other, as on a
  mesh where each worker is reached through a relay of its own), else
  ``DEFAULT_RTT``.

A client-driven step crosses ``client -> w -> client`` for every hop: it
costs ``client(w)`` per hop. A forwarded step crosses each link once, one way:
``client(first) / 2 + sum(between(a, b) / 2) + client(last) / 2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshnode.inference.records import ServerInfo

NodeID = bytes
#: round trip assumed for a worker not measured (seconds)
DEFAULT_RTT = 0.05
#: throughput assumed for a worker announcing none (tokens/s)
MIN_THROUGHPUT = 1e-3


def batch_curve(info: ServerInfo) -> tuple[tuple[int, float], ...]:
    """``(batch size, tokens/s)`` points starting at batch 1, scaled to ``info.throughput``."""
    level = max(info.throughput, MIN_THROUGHPUT)
    points = info.batch_throughput
    if not points:
        return ((1, level),)
    if points[0][0] != 1:
        return ((1, level), *points)
    scale = level / points[0][1]
    return tuple((size, speed * scale) for size, speed in points)


def throughput_at(info: ServerInfo, batch: int) -> float:
    """Tokens/s through the span when ``batch`` steps share a forward (interpolated)."""
    points = batch_curve(info)
    for (low, low_speed), (high, high_speed) in zip(points, points[1:]):
        if batch <= high:
            weight = (batch - low) / (high - low)
            return low_speed + weight * (high_speed - low_speed)
    return points[-1][1]


def step_seconds(info: ServerInfo, tokens: int = 1) -> float:
    """Seconds a new session's step of ``tokens`` positions takes through the whole span."""
    batch = (info.batch_load or 0) + 1
    return tokens * batch / max(throughput_at(info, batch), MIN_THROUGHPUT)


@dataclass(frozen=True)
class LinkCosts:
    """Round trips (seconds) of the links a route may use: client to worker, worker to worker."""

    rtts: Mapping[NodeID, float]
    workers: Mapping[NodeID, ServerInfo]

    def client(self, node_id: NodeID) -> float:
        return self.rtts.get(node_id, DEFAULT_RTT)

    def between(self, a: NodeID, b: NodeID) -> float:
        published = [
            rtt
            for rtt in (self._published(a, b), self._published(b, a))
            if rtt is not None
        ]
        if published:
            return sum(published) / len(published)
        if a in self.rtts and b in self.rtts:
            return (self.rtts[a] + self.rtts[b]) / 2
        return DEFAULT_RTT

    def _published(self, by: NodeID, to: NodeID) -> float | None:
        info = self.workers.get(by)
        return None if info is None else info.peer_rtt(to)
