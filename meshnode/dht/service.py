"""``DHTService``: a DHT-only node as a Twisted service, built from plain options.

``meshnode bootstrap`` runs it under its own reactor and ``twistd meshnode
bootstrap`` (``meshnode/tap.py``) under twistd's; both build it with
``build_dht_service``. On start it listens, prints its pinned address
``host:port#<node id>`` on one line (flushed: launchers read it), then joins
through the ``bootstrap`` addresses, if any. With ``announce_address`` (a
relay, NAT, a container) the pinned address printed and told to peers is that
one; a second line says where it listens, and ``<data dir>/listening`` holds
``host:port`` of the socket (what a relay in front of it forwards to). A
seed whose peers are all down keeps running: others can still join it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode.dht.network import DHTNode
from meshnode.errors import DHTError
from meshnode.identity import Identity, PeerAddress
from meshnode.phases import say
from meshnode.swarm.policy import join_swarm, start_swarm
from meshnode.wire.endpoint import Endpoint


@dataclass(frozen=True)
class DHTServiceOptions:
    """Where a DHT node listens, where its key lives, whom it joins."""

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path | None = None  # None: an ephemeral identity, kept in memory
    bootstrap: list[PeerAddress] = field(default_factory=list)
    swarm: Path | None = None  # a private swarm's swarm.pub (meshnode.swarm)
    announce_address: PeerAddress | None = None  # where peers reach us, if not where we listen


#: in the data dir: ``host:port`` the node listens on (written as soon as it listens)
LISTENING_FILE = "listening"


def announced_address(listening: PeerAddress, announce: PeerAddress | None) -> PeerAddress:
    """The pinned address peers dial: ``announce`` with our node id, else where we listen."""
    if announce is None:
        return listening
    return PeerAddress(announce.host, announce.port, listening.node_id)


def write_listening(data_dir: Path | None, listening: PeerAddress) -> None:
    """``<data dir>/listening``: where the socket is, for a relay or a port forward."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LISTENING_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(f"{PeerAddress(listening.host, listening.port)}\n")
        os.replace(partial, path)


class DHTService(Service):
    """Runs one ``DHTNode`` over its own listening ``Endpoint`` until stopped."""

    log = Logger()

    def __init__(self, options: DHTServiceOptions, reactor: Any, out: TextIO | None = None):
        self.options = options
        self.reactor = reactor
        self._out = out
        self.endpoint: Endpoint | None = None
        self.node: DHTNode | None = None
        self.ready: Deferred[PeerAddress] | None = None
        """Fires with our pinned address once listening and bootstrapped."""
        self.failed: Failure | None = None
        self.swarm = None

    def startService(self) -> None:
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())
        self.ready.addErrback(self._failed_start)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _start(self) -> PeerAddress:
        options = self.options
        if options.data_dir is None:
            identity = Identity.ephemeral()
        else:
            identity = Identity.load_or_create(options.data_dir)
        identity, self.swarm = join_swarm(options.swarm, identity, options.data_dir, self.reactor)
        self.endpoint = Endpoint(self.reactor, identity, {}, swarm=self.swarm)
        start_swarm(self.swarm, self.reactor)
        listening = await self.endpoint.listen(options.host, options.port)
        write_listening(options.data_dir, listening)
        address = announced_address(listening, options.announce_address)
        self.node = DHTNode(self.endpoint, clock=self.reactor, reactor=self.reactor,
                            announced=options.announce_address)
        say(str(address), self._out)  # stdout as it is now: under twistd, its log too
        if options.announce_address is not None:
            say(f"listening on {PeerAddress(listening.host, listening.port)}", self._out)
        if options.bootstrap:
            try:
                size = await self.node.bootstrap(options.bootstrap)
                self.log.info("joined the DHT: {size} contacts", size=size)
            except DHTError as exc:
                self.log.warn("running alone for now: {error}", error=exc)
        return address

    def _failed_start(self, failure: Failure) -> None:
        self.failed = failure
        print(f"meshnode bootstrap: error: {failure.getErrorMessage()}", file=sys.stderr)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        if self.ready is not None and not self.ready.called:
            self.ready.cancel()
        if self.swarm is not None:
            self.swarm.stop()
        if self.node is not None:
            await self.node.stop()
        if self.endpoint is not None:
            await self.endpoint.close()


def build_dht_service(
    options: DHTServiceOptions, reactor: Any, out: TextIO | None = None
) -> DHTService:
    """The DHT node service for ``options``; start it with ``startService``."""
    return DHTService(options, reactor, out)
