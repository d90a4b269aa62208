"""``ServeService``: ``meshnode serve`` as a Twisted service, and the resource tree it serves.

    /                     the swarm monitor page (``static/index.html``)
    /static/...           its script and style
    /api/swarm            the monitor's data as JSON
    /metrics              Prometheus text format
    /v1/models, /v1/chat/completions, /v1/completions   the OpenAI-compatible API

The mesh client (``MeshClient``) and the web server share one reactor. Start:
the client joins the DHT and loads the model's head, the port listens, the
monitor starts polling, then the ready line is printed (launchers wait for
it). Stop: in the reverse order. With ``--api-key``, ``/v1``, ``/api/swarm``
and ``/metrics`` all need ``Authorization: Bearer <key>`` (the monitor page
itself is static: its script sends the key typed in its key box). Request
bodies over ``--max-body`` bytes get 413 before they are buffered
(``meshnode.serve.bounded``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from meshnode.errors import ApiError, MeshError
from meshnode.identity import PeerAddress
from meshnode.serve.bounded import DEFAULT_MAX_BODY, bounded_requests
from meshnode.serve.resources import V1, ServeContext, write_error, write_json

DEFAULT_PORT = 8000


@dataclass
class ServeOptions:
    """Everything ``meshnode serve`` / ``twistd meshnode serve`` takes."""

    model: str
    bootstrap: list[PeerAddress] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    model_name: str | None = None
    swarm: Path | None = None  # a private swarm's swarm.pub (meshnode.swarm)
    data_dir: Path | None = None  # the server's node key and membership certificate
    verify_rate: float = 0.0  # meshnode.client.verify
    max_body: int = DEFAULT_MAX_BODY  # request bodies over this many bytes get 413


def model_ids(spec: str, source_name: str, given: str | None) -> list[str]:
    """The names requests may use: ``--model-name``, else the spec when it is a short name,
    else the model's own name; the first is the one ``/v1/models`` lists first."""
    names = [given] if given else []
    if "/" not in spec and not spec.endswith(".gguf"):
        names.append(spec)
    names.append(source_name)
    return list(dict.fromkeys(names))


class MetricsPage(Resource):
    """``/metrics``: the server's Prometheus metrics (behind ``--api-key`` when set)."""

    isLeaf = True

    def __init__(self, context: ServeContext):
        super().__init__()
        self._context = context

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            self._context.authorize(request)
        except ApiError as exc:
            return write_error(request, exc)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self._context.metrics.render()


class SwarmPage(Resource):
    """``/api/swarm``: the monitor's last snapshot (behind ``--api-key`` when set)."""

    isLeaf = True

    def __init__(self, context: ServeContext):
        super().__init__()
        self._context = context

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"cache-control", b"no-cache")
        try:
            self._context.authorize(request)
        except ApiError as exc:
            return write_error(request, exc)
        return write_json(request, 200, self._context.monitor.snapshot())


def static_folder() -> str:
    return str(resources.files("meshnode.serve") / "static")


def build_site(context: ServeContext, max_body: int = DEFAULT_MAX_BODY) -> Site:
    """The resource tree; request bodies over ``max_body`` bytes are refused with 413."""
    root = Resource()
    static = File(static_folder())
    root.putChild(b"", File(static_folder() + "/index.html"))
    root.putChild(b"static", static)
    api = Resource()
    api.putChild(b"swarm", SwarmPage(context))
    root.putChild(b"api", api)
    root.putChild(b"metrics", MetricsPage(context))
    root.putChild(b"v1", V1(context))
    site = Site(root, requestFactory=bounded_requests(max_body))
    site.displayTracebacks = False
    return site


class ServeService(Service):
    """The HTTP server over one mesh client, until stopped."""

    log = Logger()

    def __init__(self, options: ServeOptions, reactor: Any, out: TextIO | None = None):
        self.options = options
        self.reactor = reactor
        self.out = out if out is not None else sys.stdout
        self.client: Any = None
        self.context: ServeContext | None = None
        self.port: Any = None
        self.monitor: Any = None
        self.ready: Deferred | None = None
        self.failure: Any = None

    def startService(self) -> None:
        super().startService()
        self.ready = ensureDeferred(self._start())
        self.ready.addErrback(self._failed_start)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _start(self) -> str:
        from meshnode.client.api import MeshClient
        from meshnode.model.compile_cache import enable_compile_cache
        from meshnode.serve.monitor import SwarmMonitor

        options = self.options
        enable_compile_cache()  # here, not in makeService: twistd has forked by now
        self.client = MeshClient(self.reactor, options.bootstrap, options.model,
                                 swarm=options.swarm, data_dir=options.data_dir,
                                 verify_rate=options.verify_rate)
        await self.client.start()
        names = model_ids(options.model, self.client.source.name, options.model_name)
        self.monitor = SwarmMonitor(self.client, self.reactor, names[0])
        self.context = ServeContext(self.client, self.reactor, names, options.api_key,
                                    monitor=self.monitor)
        endpoint = TCP4ServerEndpoint(self.reactor, options.port, interface=options.host)
        self.port = await endpoint.listen(build_site(self.context, options.max_body))
        self.monitor.start()
        url = f"http://{options.host}:{self.port.getHost().port}"
        print(f"meshnode serve listening on {url} (model {names[0]})", file=self.out,
              flush=True)
        return url

    def _failed_start(self, failure: Any) -> None:
        self.failure = failure
        if not failure.check(MeshError):
            self.log.failure("meshnode serve failed to start", failure)
        print(f"meshnode serve: failed to start: {failure.getErrorMessage()}",
              file=sys.stderr, flush=True)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        if self.ready is not None and not self.ready.called:
            self.ready.cancel()
        if self.monitor is not None:
            self.monitor.stop()
        if self.port is not None:
            await self.port.stopListening()
        if self.client is not None:
            await self.client.close().addErrback(lambda _: None)
