"""``DelayingRelay``: a TCP relay that holds every byte ``delay`` seconds each way, for tests
and ``scripts/bench_wan.py``.

A node started with ``--announce-address`` of the relay is reached only through
it: each connection accepted is joined to a new connection to the target, and
bytes travel both ways in order, each leaving ``delay`` seconds after it came
(a link of that one-way latency and unbounded bandwidth). The target may be
unknown when the relay starts (a node on an ephemeral port tells it once it
listens): connections wait for it, up to ``TARGET_WAIT`` seconds. ``stats``
counts the connections accepted and the bytes each way. ``delay`` may change
while connections are open (a benchmark sweeping delays over one mesh): each
byte takes the delay of the moment it arrived, and order is kept.

As a process (``LocalMesh.start_relay`` starts it so)::

    python -m meshnode.testing.relay --delay-ms 20 --target-file W/data/listening \\
        --port-file R/port --stats R/stats.json [--delay-file R/delay_ms]

prints ``relay 127.0.0.1:PORT``, writes the port to ``--port-file`` and the
stats, as JSON, to ``--stats`` whenever a connection opens or closes or the
delay changes; the delay (ms) is re-read from ``--delay-file`` when it changes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twisted.internet.protocol import ClientFactory, Factory, Protocol

#: seconds a connection waits for the target to be known
TARGET_WAIT = 120.0
#: seconds between two looks at the target while it is unknown
TARGET_POLL = 0.02
#: seconds between two reads of the delay file
DELAY_POLL = 0.1

Target = Callable[[], "tuple[str, int] | None"]


@dataclass
class RelayStats:
    """What went through the relay."""

    connections: int = 0  # accepted since start
    open: int = 0
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    delay_ms: float = 0.0


class _DelayedPipe:
    """Bytes written to one side ``delay`` seconds after the other side received them, in
    order; ``close()`` loses that side once what came before it is delivered."""

    def __init__(self, clock: Any, delay: Callable[[], float]):
        self._clock = clock
        self._delay = delay
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._timer: Any = None
        self.transport: Any = None  # the side written to, once connected

    def push(self, data: bytes | None) -> None:
        due = self._clock.seconds() + self._delay()
        if self._queue:  # a shorter delay than the previous byte's never overtakes it
            due = max(due, self._queue[-1][0])
        self._queue.append((due, data))
        self._schedule()

    def connected(self, transport: Any) -> None:
        self.transport = transport
        self._schedule()

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._queue.clear()

    def _schedule(self) -> None:
        if self.transport is None or not self._queue:
            return
        if self._timer is not None and self._timer.active():
            return
        wait = max(0.0, self._queue[0][0] - self._clock.seconds())
        if wait == 0.0:
            self._deliver()
        else:
            self._timer = self._clock.callLater(wait, self._deliver)

    def _deliver(self) -> None:
        now = self._clock.seconds()
        while self._queue and self._queue[0][0] <= now:
            _, data = self._queue.popleft()
            if data is None:
                self.transport.loseConnection()
                self._queue.clear()
                return
            self.transport.write(data)
        self._schedule()


class _TargetSide(Protocol):
    """The relay's connection to the target: feeds the pipe back to the caller."""

    def __init__(self, inbound: _CallerSide):
        self.inbound = inbound

    def connectionMade(self) -> None:
        if self.inbound.gone:
            self.transport.loseConnection()
            return
        self.inbound.to_target.connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.inbound.relay.stats.bytes_from_target += len(data)
        self.inbound.to_caller.push(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.inbound.to_caller.push(None)


class _TargetFactory(ClientFactory):
    def __init__(self, inbound: _CallerSide):
        self.inbound = inbound

    def buildProtocol(self, addr: Any) -> _TargetSide:
        return _TargetSide(self.inbound)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.inbound.transport.loseConnection()


class _CallerSide(Protocol):
    """A connection accepted by the relay: joined to a new one to the target."""

    def __init__(self, relay: DelayingRelay):
        self.relay = relay
        self.to_target = _DelayedPipe(relay.clock, lambda: relay.delay)
        self.to_caller = _DelayedPipe(relay.clock, lambda: relay.delay)
        self._waited = 0.0
        self._poll: Any = None
        self.gone = False

    def connectionMade(self) -> None:
        self.relay.opened()
        self.to_caller.connected(self.transport)
        self._dial()

    def _dial(self) -> None:
        target = self.relay.target()
        if target is None:
            if self._waited >= TARGET_WAIT:
                self.transport.loseConnection()
                return
            self._waited += TARGET_POLL
            self._poll = self.relay.clock.callLater(TARGET_POLL, self._dial)
            return
        host, port = target
        self.relay.reactor.connectTCP(host, port, _TargetFactory(self))

    def dataReceived(self, data: bytes) -> None:
        self.relay.stats.bytes_to_target += len(data)
        self.to_target.push(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        if self.to_target.transport is None:
            self.to_target.cancel()
        else:
            self.to_target.push(None)
        self.to_caller.cancel()
        self.relay.closed()


class DelayingRelay(Factory):
    """Accepts connections and relays each to ``target()`` with ``delay`` seconds each way."""

    def __init__(
        self,
        reactor: Any,
        target: Target,
        delay: float,
        clock: Any = None,
        on_change: Callable[[RelayStats], None] | None = None,
    ):
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.target = target
        self.delay = delay
        self.stats = RelayStats(delay_ms=delay * 1e3)
        self._on_change = on_change or (lambda stats: None)

    def buildProtocol(self, addr: Any) -> _CallerSide:
        return _CallerSide(self)

    def opened(self) -> None:
        self.stats.connections += 1
        self.stats.open += 1
        self._on_change(self.stats)

    def closed(self) -> None:
        self.stats.open -= 1
        self._on_change(self.stats)

    def set_delay(self, delay: float) -> None:
        if delay != self.delay:
            self.delay = delay
            self.stats.delay_ms = delay * 1e3
            self._on_change(self.stats)


def target_from_file(path: Path) -> Target:
    """The target read from a ``host:port`` file, once it exists (``None`` until then)."""

    def read() -> tuple[str, int] | None:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        if not text:
            return None
        host, _, port = text.split("#")[0].rpartition(":")
        return host.strip("[]"), int(port)

    return read


def _read_delay(path: Path, relay: DelayingRelay) -> None:
    try:
        relay.set_delay(float(path.read_text().strip()) / 1e3)
    except (OSError, ValueError):
        pass  # no file yet, or half written: keep the delay we have


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshnode.testing.relay")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--target-file", type=Path, required=True,
                        help="a file holding host:port of the target (it may appear later)")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--delay-file", type=Path, default=None,
                        help="a file holding the delay in ms, re-read while running")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    def write_stats(stats: RelayStats) -> None:
        _write_atomically(args.stats, json.dumps(asdict(stats)))

    relay = DelayingRelay(reactor, target_from_file(args.target_file), args.delay_ms / 1e3,
                          on_change=write_stats)
    if args.delay_file is not None:
        LoopingCall(_read_delay, args.delay_file, relay).start(DELAY_POLL)
    port = reactor.listenTCP(args.port, relay, interface=args.host)
    write_stats(relay.stats)
    _write_atomically(args.port_file, f"{port.getHost().port}\n")
    print(f"relay {args.host}:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
