"""``WorkerService``: a worker process as a Twisted service.

Start-up, in order: identity from the data dir, the Endpoint listening on its
pinned address, the DHT joined through the bootstrap nodes, the model opened,
the span chosen (``--blocks`` or ``choose_span`` over the DHT's records), its
blocks loaded and warmed up on the compute thread (which measures
throughput), the shared paged KV cache allocated and the batched decode
rates measured (``--no-batching``: one cache per session, one step at a time
through a ``FairQueue``), the ``infer.*`` handlers installed (forwarding's over
them: ``meshnode.worker.forwarding``), the blocks announced. Then
the address is printed and written to ``<data dir>/address`` for launchers,
and the step programs of common sessions compile in the background
(``meshnode.worker.precompile``). Each phase prints one line with its time
(``StartupPhases``): on the terminal, or in the log under ``twistd``.

Nothing here starts a thread before ``startService``: twistd forks between
``makeService`` and ``startService``, and JAX (imported and initialised on
the compute thread, with the compile cache and the native kernels) must not
be running in a process that forks.

The address peers dial is the ``--announce-address`` when given (NAT, a
relay, a container), pinned with the node id: it is the one in the block
records, in the DHT requests (so in others' routing tables), on the ready
line and in ``<data dir>/address``. The socket stays on ``--host``/``--port``:
``<data dir>/listening`` says where (``host:port``), written as soon as it
listens, for whatever forwards the announced address to it.

A clean stop announces ``offline``, closes sessions, the Endpoint and the DHT
and joins the compute thread.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from meshnode.compute import ComputeThread
from meshnode.errors import MeshError, WorkerError
from meshnode.identity import Identity, PeerAddress
from meshnode.inference.directory import fetch_block_records, keys_for
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.phases import StartupPhases, say
from meshnode.swarm.policy import join_swarm, start_swarm
from meshnode.worker.admission import DEFAULT_OPEN_WAIT, OpenAdmission
from meshnode.worker.announce import DEFAULT_INTERVAL, DEFAULT_TTL, Announcer, batching_fields
from meshnode.worker.batching import BatchScheduler
from meshnode.worker.budget import CacheBudget
from meshnode.worker.compute import SpanCompute
from meshnode.worker.fairness import FairQueue
from meshnode.worker.forwarding import ForwardingHandlers
from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
from meshnode.worker.links import LinkProber, PeerRtts
from meshnode.worker.metrics import WorkerMetrics, metrics_site
from meshnode.worker.precompile import (
    Precompiler,
    paged_shapes,
    session_cache_length,
    step_shapes,
)
from meshnode.worker.sessions import DEFAULT_IDLE_TIMEOUT, DEFAULT_RECLAIM_IDLE, SessionTable
from meshnode.worker.span_choice import choose_span

DEFAULT_CACHE_TOKENS = 16384
DEFAULT_MAX_LENGTH = 2048
ADDRESS_FILE = "address"
LISTENING_FILE = "listening"  # as meshnode.dht.service's (imported late: it pulls in the wire)
#: seconds a clean stop waits for its offline records to be stored
OFFLINE_ANNOUNCE_TIMEOUT = 5.0


@dataclass
class WorkerOptions:
    """Everything ``meshnode worker`` / ``twistd meshnode worker`` takes."""

    model: str
    data_dir: Path
    bootstrap: list[PeerAddress] = field(default_factory=list)
    blocks: BlockSpan | None = None
    num_blocks: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    announce_address: PeerAddress | None = None  # where peers reach us, if not host:port
    cache_tokens: int = DEFAULT_CACHE_TOKENS
    max_length: int = DEFAULT_MAX_LENGTH
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    announce_interval: float = DEFAULT_INTERVAL
    announce_ttl: float = DEFAULT_TTL
    swarm: Path | None = None  # a private swarm's swarm.pub (meshnode.swarm)
    reclaim_idle: float = DEFAULT_RECLAIM_IDLE
    open_wait: float = DEFAULT_OPEN_WAIT
    precompile: bool = True
    metrics_port: int | None = None  # serve /metrics there (0: ephemeral)
    batching: bool = True  # steps of all sessions in shared iterations (meshnode.worker.batching)


class WorkerService(Service):
    """Serves a span of blocks to the mesh until stopped."""

    log = Logger()

    def __init__(self, options: WorkerOptions, reactor: Any, out: TextIO | None = None):
        self.options = options
        self.reactor = reactor
        self._out = out
        self.phases = StartupPhases(self._say, prefix="meshnode worker: ")
        self.thread = ComputeThread(reactor)
        self.precompiler = Precompiler(reactor)
        self.precompiled: Deferred[None] | None = None
        self.endpoint: Any = None
        self.address: PeerAddress | None = None
        """The pinned address peers dial (the announced one, else where we listen)."""
        self.dht: Any = None
        self.announcer: Announcer | None = None
        self.links = PeerRtts(reactor)
        self.prober: LinkProber | None = None
        self.table: SessionTable | None = None
        self.forwarding: ForwardingHandlers | None = None
        self.span: BlockSpan | None = None
        self.throughput = 0.0
        self.ready: Deferred[PeerAddress] | None = None
        self.failure: Any = None
        self.swarm: Any = None
        self.metrics = WorkerMetrics()
        self.metrics_port: Any = None
        self.scheduler: BatchScheduler | None = None
        self._expiry = LoopingCall(self._expire_idle)
        self._expiry.clock = reactor

    def _say(self, line: str) -> None:
        say(line, self._out)  # stdout as it is when said: twistd replaces it after makeService

    def startService(self) -> None:
        super().startService()
        self.thread.start()
        self.ready = ensureDeferred(self._start())
        self.ready.addErrback(self._failed_start)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _start(self) -> PeerAddress:
        from meshnode.dht.network import DHTNode
        from meshnode.dht.service import announced_address, write_listening
        from meshnode.wire.endpoint import Endpoint

        options = self.options
        phases = self.phases
        options.data_dir.mkdir(parents=True, exist_ok=True)
        identity = Identity.load_or_create(options.data_dir)
        identity, self.swarm = join_swarm(options.swarm, identity, options.data_dir, self.reactor)
        self.endpoint = Endpoint(self.reactor, identity, {}, swarm=self.swarm)
        start_swarm(self.swarm, self.reactor)
        listening = await self.endpoint.listen(options.host, options.port)
        write_listening(options.data_dir, listening)
        address = self.address = announced_address(listening, options.announce_address)
        if options.announce_address is not None:
            # not the pinned address: launchers take the first one they read as "ready"
            self._say(f"meshnode worker: listening on {listening.host}:{listening.port}, "
                      f"announced as {options.announce_address}")
        self.dht = DHTNode(self.endpoint, clock=self.reactor, reactor=self.reactor,
                           announced=options.announce_address)
        with phases.phase("join DHT"):
            if options.bootstrap:
                await self.dht.bootstrap(options.bootstrap)
        with phases.phase("open model"):
            # JAX, the compile cache and the native kernels start here, after twistd's fork
            dtype = await self.thread.call(_prepare_runtime)
            source = await self.thread.call(_open_model, options.model)
        self.span = await self._choose_span(source)
        compute = SpanCompute(self.thread, source, self.span, dtype, self.metrics)
        with phases.phase(f"load span {self.span}"):
            await compute.load()
        with phases.phase("compile"):
            await compute.warm_up(min(options.max_length, source.config.max_position_embeddings))
        max_length = min(options.max_length, source.config.max_position_embeddings)
        if options.batching:
            with phases.phase("allocate shared cache"):
                await compute.enable_batching(options.cache_tokens, max_length)
        with phases.phase("measure speed"):
            self.throughput = await compute.measure_throughput()
            if options.batching:
                await compute.measure_batches()
        self._serve(source, compute)
        await self._listen_metrics()
        with phases.phase("announce"):
            await self.announcer.start()
        self.prober.start()
        self._expiry.start(max(1.0, options.idle_timeout / 4), now=False)
        self._report(address, source)
        self._precompile(compute, min(options.max_length, source.config.max_position_embeddings))
        return address

    def _precompile(self, compute: SpanCompute, max_length: int) -> None:
        """The step programs of common sessions, compiled on a thread of their own."""
        if not self.options.precompile:
            return
        if compute.shared is not None:
            shared = compute.shared
            runner = compute.runner(self.span)
            shapes = paged_shapes(shared.width * shared.page_size, runner.prefix_free)
            done = self.precompiler.run_paged(runner, shapes, shared.width, shared.pages)
        else:
            shapes = step_shapes(max_length)
            done = self.precompiler.run(compute.runner(self.span), compute.hidden_size, shapes)
        done.addCallback(lambda seconds: self._say(
            f"meshnode worker: precompiled {len(shapes)} step programs in the background: "
            f"{seconds:.1f} s"))
        done.addErrback(lambda failure: self.log.failure("precompiling failed", failure))
        self.precompiled = done

    async def _choose_span(self, source: Any) -> BlockSpan:
        layers = source.config.num_layers
        if self.options.blocks is not None:
            if self.options.blocks.end > layers:
                raise WorkerError(f"--blocks {self.options.blocks}: the model has {layers} blocks")
            return self.options.blocks
        records = await fetch_block_records(self.dht, keys_for(source.fingerprint), layers)
        per_block = {block: list(found.values()) for block, found in records.items()}
        num_blocks = min(self.options.num_blocks or layers, layers)
        return choose_span(per_block, layers, num_blocks, source.fingerprint)

    def _serve(self, source: Any, compute: SpanCompute) -> None:
        options = self.options
        self.table = SessionTable(CacheBudget(options.cache_tokens), self.reactor,
                                  options.idle_timeout, cache_positions=session_cache_length,
                                  reclaim_idle=options.reclaim_idle)
        dtype = str(compute.compute_dtype)
        # a session can never be longer than the positions the model was trained for
        max_length = min(options.max_length, source.config.max_position_embeddings)
        limits = WorkerLimits(source.fingerprint, self.span, max_length, dtype)
        if options.batching:
            self.scheduler = BatchScheduler(compute, on_cache_lost=self.table.close_all,
                                            clock=self.reactor)
        handlers = InferenceHandlers(limits, self.table, compute, lambda: self.throughput,
                                     None if options.batching else FairQueue(),
                                     admission=OpenAdmission(self.table, self.reactor,
                                                             options.open_wait),
                                     metrics=self.metrics, scheduler=self.scheduler)
        self.metrics.watch(self.table)
        for message_type, handler in handlers.handlers().items():
            self.endpoint.add_handler(message_type, handler)
        # steps pushed worker to worker (issue 11): infer.step with forward, push, wait
        self.forwarding = ForwardingHandlers(handlers, self.endpoint, self.reactor)
        for message_type, handler in self.forwarding.handlers().items():
            self.endpoint.add_handler(message_type, handler)
        # a client whose connection dropped cannot step its sessions: free their caches
        self.endpoint.on_disconnect(self.table.close_owned)

        def info(state: WorkerState) -> ServerInfo:
            return ServerInfo(str(self.address), self.span, state, self.throughput,
                              self.table.budget.free, dtype, source.fingerprint,
                              max_length=max_length, peer_rtts=self.links.published(),
                              **batching_fields(self.scheduler or compute))

        self.announcer = Announcer(self.dht, self.reactor, self.span,
                                   keys_for(source.fingerprint), info,
                                   ttl=options.announce_ttl, interval=options.announce_interval)
        self.prober = LinkProber(self.dht, self.endpoint, self.reactor,
                                 keys_for(source.fingerprint), self.span,
                                 source.config.num_layers, self.links,
                                 interval=options.announce_interval,
                                 on_new_peers=self.announcer.refresh_now)

    async def _listen_metrics(self) -> None:
        if self.options.metrics_port is None:
            return
        from twisted.internet.endpoints import TCP4ServerEndpoint

        endpoint = TCP4ServerEndpoint(self.reactor, self.options.metrics_port,
                                      interface=self.options.host)
        self.metrics_port = await endpoint.listen(metrics_site(self.metrics))
        port = self.metrics_port.getHost().port
        self._say(f"meshnode worker metrics on http://{self.options.host}:{port}/metrics")

    def _report(self, address: PeerAddress, source: Any) -> None:
        """Print the ready line, then write the address file (launchers wait for either)."""
        self._say(f"meshnode worker {address} serving blocks {self.span} of {source.name} "
                  f"({self.throughput:.1f} tokens/s)")
        path = self.options.data_dir / ADDRESS_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(f"{address}\n")
        os.replace(partial, path)

    def _expire_idle(self) -> None:
        if self.table is not None:
            for session in self.table.expire_idle():
                self.log.info("session {sid} timed out", sid=session.session_id.hex())

    def _failed_start(self, failure: Any) -> None:
        self.failure = failure
        if not failure.check(MeshError):  # a named error says it all; anything else: traceback
            self.log.failure("worker failed to start", failure)
        print(f"meshnode worker: failed to start: {failure.getErrorMessage()}",
              file=sys.stderr, flush=True)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        if self.ready is not None and not self.ready.called:
            self.ready.cancel()
        if self._expiry.running:
            self._expiry.stop()
        if self.swarm is not None:
            self.swarm.stop()
        if self.prober is not None:
            self.prober.stop()
        if self.announcer is not None:
            offline = self.announcer.stop()
            offline.addTimeout(OFFLINE_ANNOUNCE_TIMEOUT, self.reactor)
            await offline.addErrback(lambda _: None)
        if self.metrics_port is not None:
            await self.metrics_port.stopListening()
        if self.forwarding is not None:
            self.forwarding.stop()
        if self.table is not None:
            self.table.close_all()
        if self.dht is not None:
            await self.dht.stop().addErrback(lambda _: None)
        if self.endpoint is not None:
            await self.endpoint.close().addErrback(lambda _: None)
        self.precompiler.stop()
        self.thread.stop()
        for name in (ADDRESS_FILE, LISTENING_FILE):
            (self.options.data_dir / name).unlink(missing_ok=True)


def _prepare_runtime() -> Any:
    """On the compute thread: the compile cache and native kernels on, the compute dtype."""
    from meshnode.model.compile_cache import enable_compile_cache
    from meshnode.model.dtypes import default_compute_dtype

    enable_compile_cache()
    return default_compute_dtype()


def _open_model(spec: str) -> Any:
    from meshnode.model.source import open_model

    return open_model(spec)
