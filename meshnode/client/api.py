"""The client API: ``MeshClient`` for Twisted code, ``generate`` / ``stream`` for everyone else.

Inside Twisted (Deferreds, or coroutines via ``Deferred.fromCoroutine``)::

    client = MeshClient(reactor, [PeerAddress.parse("127.0.0.1:7000#ab12...")])
    await client.start()
    result = await client.generate("What is the capital of France?",
                                   GenerationOptions(max_new_tokens=32),
                                   on_text=lambda piece: print(piece, end=""))
    print(result.text, result.route, result.decode_tok_s)
    await client.close()

Without Twisted (the reactor runs in a background thread)::

    from meshnode.client.api import generate, stream
    result = generate("What is the capital of France?", bootstrap=["127.0.0.1:7000#ab12..."])
    for piece in stream("Tell me a story", bootstrap=[...], max_new_tokens=100):
        print(piece, end="", flush=True)

The client holds the model's embeddings, final norm and LM head (it opens the
same model spec as the workers), finds a route in the DHT, opens a session on
each worker of the route, and drives the model engine's step-driven
``Generation`` through them (``meshnode.client.generate``). Generations run as
coroutines on the reactor; the head's JAX work goes to the client's one
compute thread, whatever the number of generations. Cancelling the Deferred of
``generate`` / ``generate_ids`` stops that generation, closes its sessions on
the workers, then fails the Deferred with ``CancelledError``.
"""

from __future__ import annotations

import atexit
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import blockingCallFromThread

from meshnode.client.chain import DEFAULT_STEP_TIMEOUT, InferenceChain
from meshnode.client.generate import (
    GenerationOptions,
    HeadCompute,
    MeshGenerationResult,
    StopRequest,
    cancellable,
    generate_on_chain,
    mesh_result,
)
from meshnode.client.recovery import RecoveryOptions, SpanRecovery
from meshnode.client.routing import discovery
from meshnode.client.routing.route import NodeID, Route
from meshnode.client.verify import LifetimeBans, TrustRecord, verified_generation
from meshnode.compute import ComputeThread
from meshnode.errors import ClientError, MeshError, ModelError
from meshnode.identity import Identity, PeerAddress
from meshnode.inference.directory import fetch_block_records, keys_for
from meshnode.inference.records import BlockSpan, ServerInfo
from meshnode.model.decoding import Generation, TextStream, prompt_token_ids
from meshnode.model.names import DEFAULT_MODEL
from meshnode.model.sampling import Sampler, SamplingOptions

#: greedy, 64 new tokens, no chat template: as ``meshnode generate``
DEFAULT_OPTIONS = GenerationOptions()
#: generations one client runs at once (more wait their turn); a worker's default limit
#: of sessions per client is 128 too. No thread is held per generation.
MAX_CONCURRENT_GENERATIONS = 128


class MeshClient:
    """Generation through the mesh for Twisted code; every method returns a Deferred."""

    def __init__(
        self,
        reactor: Any,
        bootstrap: Iterable[PeerAddress | str],
        model: str = DEFAULT_MODEL,
        identity: Identity | None = None,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        max_concurrent: int = MAX_CONCURRENT_GENERATIONS,
        swarm: Path | str | None = None,
        data_dir: Path | str | None = None,
        verify_rate: float = 0.0,
        verify_seed: int | None = None,
        forwarding: bool = True,
    ):
        """``swarm``: a private swarm's ``swarm.pub`` (talk only to its members);
        ``data_dir``: where this client's node key and membership certificate live
        (``identity`` wins over its key; a ``swarm`` client needs one or the other
        carrying a membership); ``verify_rate``: the fraction of steps recomputed on a
        second replica (``meshnode.client.verify``; 0: none); ``forwarding``: steps go
        worker to worker (client -> A -> B -> C -> client, ``meshnode.client.chain``);
        False: the client calls each worker in turn. The attribute of that name may be
        changed between generations."""
        self.reactor = reactor
        self.swarm_pub = Path(swarm) if swarm is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.swarm: Any = None
        if identity is None and self.data_dir is not None:
            identity = Identity.load_or_create(self.data_dir)
        self.bootstrap = [a if isinstance(a, PeerAddress) else PeerAddress.parse(a)
                          for a in bootstrap]
        self.model_spec = model
        self.identity = identity or Identity.ephemeral()
        self.step_timeout = step_timeout
        self.max_concurrent = max_concurrent
        self._running = DeferredSemaphore(max_concurrent)
        # every JAX call of the client (loading, embed, logits): one thread for all generations
        self.compute = ComputeThread(reactor, name="meshnode-client-compute")
        self._head_compute: HeadCompute | None = None
        self._started: Deferred[None] | None = None
        self.endpoint: Any = None
        self.dht: Any = None
        self.source: Any = None
        self.head: Any = None
        self.tokenizer: Any = None
        self.last_route: Route | None = None
        # workers that failed us lately, and how hard to try before failing (issue 6)
        self.bans = LifetimeBans(reactor)
        # verified outputs (issue 14): checks passed and measured speeds, per worker
        self.verify_rate = float(verify_rate)
        self.verify_rng = random.Random(verify_seed)
        self.trust = TrustRecord()
        self.recovery_options = RecoveryOptions()
        self.forwarding = bool(forwarding)

    def start(self) -> Deferred[None]:
        """Join the DHT and load the head; safe to call many times."""
        if self._started is None:
            self._started = Deferred.fromCoroutine(self._start())
        return self._started

    def block_records(self) -> Deferred[dict[int, dict[NodeID, ServerInfo]]]:
        """Per block, the valid server infos in the DHT now (for status and tests)."""
        return Deferred.fromCoroutine(self._block_records())

    def find_route(self, max_length: int = 0, banned: Iterable[NodeID] = ()) -> Deferred[Route]:
        """The least-latency route now (``RouteNotFound`` when blocks are not covered)."""
        return Deferred.fromCoroutine(self._find_route(max_length, set(banned)))

    def wait_for_route(self, timeout: float, max_length: int = 0) -> Deferred[Route]:
        """Poll the DHT until every block is covered, or fail after ``timeout`` seconds."""
        return Deferred.fromCoroutine(self._wait_for_route(timeout, max_length))

    def generate(
        self,
        prompt: str,
        options: GenerationOptions = DEFAULT_OPTIONS,
        on_text: Callable[[str], None] | None = None,
    ) -> Deferred[MeshGenerationResult]:
        """Generate from a text prompt; ``on_text`` gets each new piece on the reactor thread.

        Cancelling the Deferred stops the generation and closes its sessions (see module doc).
        """
        return cancellable(lambda stop: self._generate_text(prompt, options, on_text, stop))

    def generate_ids(
        self,
        prompt_ids: list[int],
        options: GenerationOptions = DEFAULT_OPTIONS,
        on_token: Callable[[int], None] | None = None,
        route: Route | None = None,
    ) -> Deferred[MeshGenerationResult]:
        """Generate from token ids; ``on_token`` gets each new id on the reactor thread.

        ``route``: go through these hops instead of finding the best route now.
        Cancelling the Deferred stops the generation and closes its sessions (see module doc).
        """
        ids = list(prompt_ids)
        return cancellable(lambda stop: self._generate(ids, options, on_token, route, stop))

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    # -- internals -------------------------------------------------------

    async def _start(self) -> None:
        from meshnode.dht.network import DHTNode
        from meshnode.swarm.policy import join_swarm
        from meshnode.wire.endpoint import Endpoint

        self.identity, self.swarm = join_swarm(self.swarm_pub, self.identity, self.data_dir,
                                               self.reactor)
        if self.swarm is not None:
            self.swarm.start()
        self.compute.start()
        self.endpoint = Endpoint(self.reactor, self.identity, {}, swarm=self.swarm)
        self.dht = DHTNode(self.endpoint, clock=self.reactor, reactor=self.reactor)
        loaded = self.compute.call(_load_client_side, self.model_spec)
        if self.bootstrap:
            await self.dht.bootstrap(self.bootstrap)
        self.source, self.head, self.tokenizer = await loaded
        self._head_compute = HeadCompute(self.head, self.compute, clock=self.reactor)

    def _key_for(self, block: int) -> bytes:
        return keys_for(self.source.fingerprint)(block)

    async def _block_records(self) -> dict[int, dict[NodeID, ServerInfo]]:
        await self.start()
        return await fetch_block_records(self.dht, self._key_for, self.source.config.num_layers)

    async def _find_route(self, max_length: int, banned: set[NodeID]) -> Route:
        await self.start()
        whole = BlockSpan(0, self.source.config.num_layers)
        route = await discovery.discover_route(
            self.dht, self.endpoint, self.reactor, self._key_for,
            whole, self.source.fingerprint, banned, max_length, forwarding=self.forwarding,
        )
        self.last_route = route
        return route

    async def _wait_for_route(self, timeout: float, max_length: int) -> Route:
        deadline = self.reactor.seconds() + timeout
        return await discovery.wait_for_route(
            lambda: self._find_route(max_length, set()), self.reactor, deadline
        )

    async def _generate_text(self, prompt: str, options: GenerationOptions,
                             on_text: Callable[[str], None] | None,
                             stop: StopRequest) -> MeshGenerationResult:
        await self.start()
        if self.tokenizer is None:
            raise ModelError(f"model {self.model_spec} has no tokenizer: give token ids")
        prompt_ids = prompt_token_ids(self.tokenizer, prompt, options.chat, options.system)
        on_token = None
        if on_text is not None:
            text_stream = TextStream(self.tokenizer, self._stop_ids())

            def on_token(token: int) -> None:
                piece = text_stream.push(token)
                if piece:
                    on_text(piece)

        return await self._generate(prompt_ids, options, on_token, None, stop)

    async def _generate(self, prompt_ids: list[int], options: GenerationOptions,
                        on_token: Callable[[int], None] | None,
                        route: Route | None, stop: StopRequest) -> MeshGenerationResult:
        await self.start()
        await self._running.acquire()
        try:
            stop.check()
            if self.verify_rate > 0:
                return await verified_generation(self, prompt_ids, options, on_token, route, stop)
            generation = Generation(prompt_ids, max_new_tokens=options.max_new_tokens,
                                    sampler=Sampler(options.sampling), stop_ids=self._stop_ids())
            return await self._run(generation, on_token, route, stop)
        finally:
            self._running.release()

    async def _run(self, generation: Generation, on_token: Callable[[int], None] | None,
                   route: Route | None, stop: StopRequest) -> MeshGenerationResult:
        max_length = len(generation.prompt_ids) + generation.max_new_tokens
        if route is None:
            route = await self._find_route(max_length, set(self.bans.banned()))
        recovery = SpanRecovery(self.endpoint, self.dht, self.reactor, self._key_for,
                                self.source.fingerprint, self.bans, self.recovery_options,
                                forwarding=self.forwarding)
        chain = InferenceChain(self.endpoint, route, self.source.fingerprint, max_length,
                               self.step_timeout, recovery, self.forwarding)
        loop_result = await generate_on_chain(
            generation, self._head_compute, chain, on_token, stop, self._text
        )
        # the hops at the end: recovery may have replaced some since the start
        final = Route(tuple(s.hop for s in chain.sessions), route.expected_latency)
        return mesh_result(loop_result, self._text(loop_result.token_ids),
                           list(generation.prompt_ids), final)

    def _text(self, token_ids: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(token_ids)) if self.tokenizer is not None else ""

    def _stop_ids(self) -> frozenset[int]:
        """As local generation: EOS ids of the config and of the tokenizer."""
        tokenizer_ids = self.tokenizer.eos_ids if self.tokenizer is not None else ()
        return frozenset(tokenizer_ids) | frozenset(self.source.config.eos_token_ids)

    async def _close(self) -> None:
        if self.swarm is not None:
            self.swarm.stop()
        if self.dht is not None:
            await self.dht.stop()
        if self.endpoint is not None:
            await self.endpoint.close()
        self.compute.stop()


def _load_client_side(spec: str) -> tuple[Any, Any, Any]:
    from meshnode.model.dtypes import default_compute_dtype
    from meshnode.model.head import ClientHead
    from meshnode.model.source import open_model

    source = open_model(spec)
    dtype = default_compute_dtype()  # as local generation: the same logits, the same tokens
    head = ClientHead(source.config, source.load_client_params(dtype), dtype)
    try:
        tokenizer = source.tokenizer()
    except ModelError:  # a bare checkpoint: ids in, ids out
        tokenizer = None
    return source, head, tokenizer


# --- the blocking API ------------------------------------------------------------


class _BackgroundReactor:
    """The global reactor, run in a daemon thread for callers outside Twisted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._clients: dict[tuple, MeshClient] = {}

    def reactor(self) -> Any:
        from twisted.internet import reactor

        with self._lock:
            if self._thread is None:
                if reactor.running:
                    raise ClientError("the reactor already runs here: use MeshClient instead")
                running = threading.Event()
                reactor.callWhenRunning(running.set)
                self._thread = threading.Thread(
                    target=reactor.run, kwargs={"installSignalHandlers": False},
                    name="meshnode-reactor", daemon=True)
                self._thread.start()
                running.wait()
                atexit.register(self.shutdown)
        return reactor

    def client(self, bootstrap: Iterable[str | PeerAddress], model: str,
               swarm: Any = None, data_dir: Any = None, verify_rate: float = 0.0) -> MeshClient:
        reactor = self.reactor()
        key = (tuple(str(a) for a in bootstrap), model, str(swarm), str(data_dir), verify_rate)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = MeshClient(reactor, list(bootstrap), model,
                                                swarm=swarm, data_dir=data_dir,
                                                verify_rate=verify_rate)
            return self._clients[key]

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self.reactor(), function, *args)

    def shutdown(self) -> None:
        reactor = self.reactor()
        for client in list(self._clients.values()):
            try:
                blockingCallFromThread(reactor, client.close)
            except MeshError:
                pass
        self._clients.clear()
        reactor.callFromThread(reactor.stop)


_background = _BackgroundReactor()


def options_from(max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 system: str | None = None) -> GenerationOptions:
    return GenerationOptions(max_new_tokens, SamplingOptions(temperature, top_k, top_p, seed),
                             chat, system)


def generate(prompt: str, bootstrap: Iterable[str | PeerAddress], model: str = DEFAULT_MODEL,
             on_text: Callable[[str], None] | None = None,
             swarm: Any = None, data_dir: Any = None, verify_rate: float = 0.0,
             **options: Any) -> MeshGenerationResult:
    """Generate through the mesh, blocking; ``options`` as ``options_from``.

    ``on_text`` receives each new piece of text, on the background reactor thread;
    ``swarm``, ``data_dir`` and ``verify_rate`` as ``MeshClient``'s.
    """
    client = _background.client(bootstrap, model, swarm, data_dir, verify_rate)
    return _background.call(client.generate, prompt, options_from(**options), on_text)


def generate_ids(prompt_ids: list[int], bootstrap: Iterable[str | PeerAddress],
                 model: str = DEFAULT_MODEL, swarm: Any = None, data_dir: Any = None,
                 verify_rate: float = 0.0, **options: Any) -> MeshGenerationResult:
    """Generate from token ids through the mesh, blocking (for models without a tokenizer)."""
    client = _background.client(bootstrap, model, swarm, data_dir, verify_rate)
    return _background.call(client.generate_ids, list(prompt_ids), options_from(**options))


def stream(prompt: str, bootstrap: Iterable[str | PeerAddress], model: str = DEFAULT_MODEL,
           **options: Any) -> Iterator[str]:
    """Generate through the mesh, yielding text pieces as they come."""
    client = _background.client(bootstrap, model)
    pieces: queue.Queue = queue.Queue()
    done = object()
    reactor = _background.reactor()

    def start() -> None:
        d = client.generate(prompt, options_from(**options), pieces.put)
        d.addBoth(lambda outcome: pieces.put((done, outcome)))

    reactor.callFromThread(start)
    while True:
        item = pieces.get()
        if isinstance(item, tuple) and item and item[0] is done:
            outcome = item[1]
            if hasattr(outcome, "raiseException"):
                outcome.raiseException()
            return
        yield item


def wait_for_route(bootstrap: Iterable[str | PeerAddress], model: str = DEFAULT_MODEL,
                   timeout: float = 60.0) -> Route:
    """Block until the mesh covers every block of ``model`` (or ``RouteNotFound``)."""
    client = _background.client(bootstrap, model)
    return _background.call(client.wait_for_route, timeout)


def block_records(bootstrap: Iterable[str | PeerAddress],
                  model: str = DEFAULT_MODEL) -> dict[int, dict[NodeID, ServerInfo]]:
    """Per block of ``model``, the workers announcing it now (blocking)."""
    client = _background.client(bootstrap, model)
    return _background.call(client.block_records)



def background_client(bootstrap: Iterable[str | PeerAddress],
                      model: str = DEFAULT_MODEL, swarm: Any = None,
                      data_dir: Any = None, verify_rate: float = 0.0) -> MeshClient:
    """The started ``MeshClient`` the blocking API uses; call its methods with ``call``."""
    client = _background.client(bootstrap, model, swarm, data_dir, verify_rate)
    _background.call(client.start)
    return client


def call(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` on the background reactor and wait for its Deferred's result."""
    return _background.call(function, *args)
