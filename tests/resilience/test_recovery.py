"""Client recovery in memory: bans, sub-span routes, replay onto replacement workers.

Workers here are the real ``InferenceHandlers`` (and forwarding handlers) over a
fake compute (each block adds its index + 1 to every position, and the cache
records the positions seen), reached through an in-memory endpoint that can
kill or stall a worker. Chains forward worker to worker, as by default.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from meshnode.client.chain import InferenceChain
from meshnode.client.recovery import BanList, RecoveryOptions, SpanRecovery
from meshnode.client.routing.route import Route, RouteHop, span_route
from meshnode.errors import (
    ConnectionClosed,
    MeshError,
    RemoteError,
    RequestTimeout,
    RouteNotFound,
)
from meshnode.identity import Identity, PeerAddress
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.wire.message import PeerInfo
from meshnode.worker.budget import CacheBudget
from meshnode.worker.forwarding import ForwardingHandlers
from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
from meshnode.worker.sessions import SessionTable

H = 4
LAYERS = 6
MODEL = "fp"
CLIENT_IDENTITY = Identity.ephemeral()  # signs the capabilities of forwarded steps
CLIENT = PeerInfo(CLIENT_IDENTITY.node_id, "127.0.0.1", 9)


class BlockSum:
    """Block ``b`` adds ``b + 1``; the cache is the list of positions computed."""

    hidden_size = H

    def new_cache(self, span, max_length):
        return succeed([])

    def forward(self, span, hidden, start, cache):
        added = sum(b + 1 for b in span.blocks())
        return succeed((hidden + added, cache + list(range(start, start + hidden.shape[1]))))


class FakeWorker:
    def __init__(self, node_id: bytes, span: BlockSpan, mesh: FakeMesh,
                 cache_tokens: int = 1000):
        self.node_id = node_id
        self.span = span
        ids = (i.to_bytes(16, "big") for i in itertools.count(1))
        self.table = SessionTable(CacheBudget(cache_tokens), Clock(), 60, lambda: next(ids))
        inference = InferenceHandlers(WorkerLimits(MODEL, span, 64, "float32"), self.table,
                                      BlockSum())
        # pushes to the next hop go through the mesh, sent as this worker
        link = SimpleNamespace(identity=SimpleNamespace(node_id=node_id),
                               request=lambda a, m, timeout: mesh.request(a, m, timeout, self))
        forwarding = ForwardingHandlers(inference, link, mesh.clock)
        self.handlers = {**inference.handlers(), **forwarding.handlers()}
        self.state = "up"  # "up", "dead" (connection refused) or "stalled" (times out)

    @property
    def address(self) -> PeerAddress:
        return PeerAddress("127.0.0.1", 1000 + self.node_id[0], self.node_id)

    def info(self) -> ServerInfo:
        return ServerInfo(
            str(self.address),
            self.span,
            WorkerState.ONLINE,
            100.0,
            self.table.budget.free,
            "float32",
            MODEL,
        )


class FakeMesh:
    """An endpoint and a DHT over ``FakeWorker``s, on a fake clock."""

    def __init__(self, spans: list[str]):
        self.clock = Clock()
        self.identity = CLIENT_IDENTITY
        self.workers = {
            bytes([i + 1]) * 32: FakeWorker(bytes([i + 1]) * 32, BlockSpan.parse(s), self)
            for i, s in enumerate(spans)
        }

    def worker(self, span: str) -> FakeWorker:
        return next(w for w in self.workers.values() if w.span == BlockSpan.parse(span))

    def request(self, address, message, timeout, sender: FakeWorker | None = None):
        worker = self.workers[address.node_id]
        if worker.state == "dead":
            return fail(ConnectionClosed("connection refused"))
        if worker.state == "stalled":
            d = Deferred()
            self.clock.callLater(timeout, d.errback, RequestTimeout("no answer"))
            return d
        peer = CLIENT if sender is None else PeerInfo(sender.node_id, "127.0.0.1", 1)
        return maybeDeferred(worker.handlers[message.type], peer, message).addErrback(_remote)

    def get(self, key):
        block = key[0]
        return succeed(
            {
                w.node_id: _Record(w.info().to_record())
                for w in self.workers.values()
                if block in w.span.blocks()
            }
        )

    def recovery(self, **options) -> SpanRecovery:
        return SpanRecovery(
            self,
            self,
            self.clock,
            lambda b: bytes([b]) * 32,
            MODEL,
            BanList(self.clock),
            RecoveryOptions(**options),
        )

    def route(self, *spans: str) -> Route:
        hops = []
        for span in spans:
            worker = self.worker(span)
            hops.append(RouteHop(worker.node_id, worker.info(), worker.span))
        return Route(tuple(hops), 0.0)


def _remote(failure):
    """As the wire: a worker's named error reaches the caller as ``RemoteError``."""
    error = failure.value
    if isinstance(error, MeshError):
        raise RemoteError(error.code, str(error))
    return failure


class _Record:
    def __init__(self, value):
        self.value = value


def run(clock: Clock, d, limit: float = 600.0):
    """Advance the fake clock until ``d`` fires; its result (or raise its failure)."""
    out = []
    d = maybeDeferred(lambda: d)
    d.addBoth(out.append)
    waited = 0.0
    while not out and waited < limit:
        clock.advance(0.5)
        waited += 0.5
    assert out, "deferred never fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def expected(x: np.ndarray) -> np.ndarray:
    return x + sum(b + 1 for b in range(LAYERS))


def steps(chain: InferenceChain, clock: Clock, count: int, kill=None) -> list[np.ndarray]:
    """A prefill of 3 positions then ``count - 1`` decode steps; ``kill(i)`` before step i."""
    outputs = []
    rng = np.random.default_rng(0)
    for i in range(count):
        if kill is not None:
            kill(i)
        x = rng.integers(-50, 50, (1, 3 if i == 0 else 1, H)).astype(np.float32)
        y = run(clock, Deferred.fromCoroutine(chain.forward(x)))
        np.testing.assert_array_equal(y, expected(x))
        outputs.append(y)
    return outputs


def test_ban_grows_on_repeats_and_lapses():
    """When a worker is banned again and again, then each ban is twice the last, capped;
    and once it lapses it is routable again."""
    clock = Clock()
    bans = BanList(clock, base=10, growth=2, maximum=35, forget_after=1000)
    assert [bans.ban(b"w") for _ in range(4)] == [10, 20, 35, 35]
    assert bans.is_banned(b"w") and bans.banned() == {b"w"}
    clock.advance(36)
    assert not bans.is_banned(b"w") and bans.banned() == frozenset()
    assert bans.ban(b"w") == 35  # strikes remembered within forget_after
    clock.advance(35 + 1001)
    assert bans.banned() == frozenset() and bans.strikes(b"w") == 0
    assert bans.ban(b"w") == 10


def test_span_route_splits_a_span_over_several_workers():
    """When only 1:3 and 3:5 cover the span 1:5, then the route uses both, absolute spans."""
    mesh = FakeMesh(["0:3", "3:6", "0:6"])
    workers = {w.node_id: w.info() for w in mesh.workers.values()}
    whole = mesh.worker("0:6").node_id
    route = span_route(workers, BlockSpan(1, 5), MODEL, banned={whole})
    assert [(h.span.start, h.span.end) for h in route.hops] == [(1, 3), (3, 5)]
    with pytest.raises(RouteNotFound) as caught:
        span_route(workers, BlockSpan(1, 5), MODEL, banned={whole, mesh.worker("3:6").node_id})
    assert caught.value.missing == (3, 4)


@pytest.mark.parametrize("failure", ["dead", "stalled", "error"])
def test_replay_onto_a_replacement_gives_the_same_outputs(failure):
    """When the middle worker dies, stalls or answers an error at step 4, then it is banned,
    its span is replayed onto the other workers that cover it, and every output is as
    without the fault."""
    mesh = FakeMesh(["0:2", "2:4", "4:6", "0:3", "3:6"])
    recovery = mesh.recovery()
    chain = InferenceChain(mesh, mesh.route("0:2", "2:4", "4:6"), MODEL, 32, 5.0, recovery)
    run(mesh.clock, Deferred.fromCoroutine(chain.open()))
    victim = mesh.worker("2:4")

    def kill(step: int) -> None:
        if step == 4:
            if failure == "error":
                victim.table.close_all()  # its answer: unknown_session
            else:
                victim.state = failure

    steps(chain, mesh.clock, 8, kill)
    assert recovery.bans.is_banned(victim.node_id)
    assert [str(s.span) for s in chain.sessions] == ["0:2", "2:3", "3:4", "4:6"]
    assert [s.timeout for s in chain.sessions] == [5.0] * 4  # the step timeout, kept
    assert chain.position == 3 + 7
    replacement = mesh.worker("0:3").table.get(CLIENT.node_id, chain.sessions[1].session_id)
    assert replacement.cache == list(range(10))  # the replay rebuilt every position


def test_open_falls_back_when_a_worker_has_no_capacity():
    """When a worker of the route refuses the session (no capacity), then another worker
    serves its span and generation goes on."""
    mesh = FakeMesh(["0:6", "0:3", "3:6"])
    mesh.worker("0:6").table.budget.reserve(990)
    chain = InferenceChain(mesh, mesh.route("0:6"), MODEL, 32, 5.0, mesh.recovery())
    run(mesh.clock, Deferred.fromCoroutine(chain.open()))
    assert [str(s.span) for s in chain.sessions] == ["0:3", "3:6"]
    steps(chain, mesh.clock, 3)


def test_no_route_names_the_missing_blocks_after_a_bounded_wait():
    """When the only worker of blocks 3-5 dies and nobody else serves them, then the step
    fails with RouteNotFound naming 3, 4, 5 once the route wait has passed, not before."""
    mesh = FakeMesh(["0:3", "3:6"])
    chain = InferenceChain(
        mesh, mesh.route("0:3", "3:6"), MODEL, 32, 5.0, mesh.recovery(route_wait=20.0)
    )
    run(mesh.clock, Deferred.fromCoroutine(chain.open()))
    mesh.worker("3:6").state = "dead"
    began = mesh.clock.seconds()
    with pytest.raises(RouteNotFound) as caught:
        steps(chain, mesh.clock, 1)
    assert caught.value.missing == (3, 4, 5)
    assert 20.0 <= mesh.clock.seconds() - began <= 25.0


def test_worker_errors_are_remote_errors_of_the_worker():
    """When a worker answers a step with an error frame, then recovery treats it as the
    worker's failure (not the client's)."""
    from meshnode.client.recovery import recoverable

    assert recoverable(RemoteError("internal", "boom"))
    assert not recoverable(RouteNotFound("x", (1,)))
    assert not recoverable(ValueError("local bug"))


def test_replacement_failing_during_replay_is_banned_too():
    """When the first replacement dies while replaying, then it is banned too and the next
    worker of that span is used."""
    mesh = FakeMesh(["0:6", "0:3", "3:6", "3:6"])
    recovery = mesh.recovery()
    chain = InferenceChain(mesh, mesh.route("0:6"), MODEL, 32, 5.0, recovery)
    run(mesh.clock, Deferred.fromCoroutine(chain.open()))
    steps(chain, mesh.clock, 2)
    # of the two equal workers of 3:6, routes prefer the lower node id: make it die mid-replay
    first = min(w.node_id for w in mesh.workers.values() if w.span == BlockSpan(3, 6))

    def dying_step(peer, message, worker=mesh.workers[first]):
        worker.state = "dead"
        return fail(ConnectionClosed("died mid-replay"))

    mesh.workers[first].handlers[messages.STEP] = dying_step
    mesh.worker("0:6").state = "dead"
    steps(chain, mesh.clock, 3)
    assert recovery.bans.banned() == {first, mesh.worker("0:6").node_id}
    assert [str(s.span) for s in chain.sessions] == ["0:3", "3:6"]
    assert chain.sessions[1].hop.node_id != first and recovery.replacements == 1


def test_a_chain_that_cannot_open_closes_what_it_opened():
    """When a hop refuses its session and nobody else serves its span, then opening fails
    with RouteNotFound after the route wait, and the other hops' sessions are closed."""
    mesh = FakeMesh(["0:3", "3:6"])
    mesh.worker("3:6").table.budget.reserve(1000)
    chain = InferenceChain(
        mesh, mesh.route("0:3", "3:6"), MODEL, 32, 5.0, mesh.recovery(route_wait=2.0)
    )
    with pytest.raises(RouteNotFound) as caught:
        run(mesh.clock, Deferred.fromCoroutine(chain.open()))
    assert caught.value.missing == (3, 4, 5)
    assert mesh.worker("0:3").table.budget.used == 0
