"""Verified outputs in memory: replicas, checks, who is judged a liar, and what is verified.

Workers are functions of a step's input (no network, no reactor): honest ones compute
``2 x + 1``, a liar adds noise of the output's own scale. A fake clock times steps.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from meshnode.client.routing.route import Route, RouteHop
from meshnode.client.verify import (
    LifetimeBans,
    TrustRecord,
    Verifier,
    first_mismatch,
    tolerance,
)
from meshnode.errors import OutputMismatch
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState

SPAN = BlockSpan(0, 6)
H = 8


def honest(x: np.ndarray) -> np.ndarray:
    return 2 * x + 1  # [1, T, H]


def liar(x: np.ndarray) -> np.ndarray:
    out = honest(x)
    return out + np.random.default_rng(0).standard_normal(out.shape) * out.std()


WORKERS: dict[bytes, object] = {}


def worker(name: str, compute=honest) -> RouteHop:
    node_id = name.encode().ljust(32, b".")
    WORKERS[node_id] = compute
    info = ServerInfo(f"127.0.0.1:1#{node_id.hex()}", SPAN, WorkerState.ONLINE, 10.0, 1000,
                      "float32", "m")
    return RouteHop(node_id, info, SPAN)


class FakeSession:
    """A SpanSession over an in-memory worker (the function its node id names)."""

    def __init__(self, endpoint, hop, max_length, timeout=1.0):
        self.endpoint, self.hop, self.max_length, self.timeout = endpoint, hop, max_length, timeout
        self.history: list[np.ndarray] = []
        self.position = 0
        self.opened = self.closed = False

    @property
    def span(self):
        return self.hop.span

    async def open(self, model):
        self.opened = True

    async def step(self, hidden):
        self.history.append(hidden)
        self.position += hidden.shape[1]
        return WORKERS[self.hop.node_id](hidden).astype(np.float32)

    async def close(self):
        self.closed = True

    async def settle(self):
        """Hop-by-hop steps: every input is in already."""

    def inputs(self):
        return np.concatenate(self.history, axis=1)


class InMemoryVerifier(Verifier):
    session_type = FakeSession

    def __init__(self, others: list[RouteHop], rate: float, record=None):
        clock = Clock()
        recovery = SimpleNamespace(clock=clock, model="m",
                                   options=SimpleNamespace(max_attempts=0))
        self.bans_ = LifetimeBans(clock)
        super().__init__(recovery, record or TrustRecord(), self.bans_, rate,
                         random.Random(1), 64)
        self.others = others

    async def _other_route(self, span, exclude):
        for hop in self.others:
            if hop.node_id not in exclude and not self.bans.is_banned(hop.node_id):
                return Route((hop,), 0.0)
        return None


def chain_of(hop: RouteHop) -> SimpleNamespace:
    session = FakeSession(None, hop, 64)
    return SimpleNamespace(sessions=[session], abandoned=[], position=0, forwarding=False)


def run(coroutine):
    """Everything here completes synchronously: fire and return the outcome."""
    outcome = []
    Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    assert outcome, "the coroutine did not complete"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def step_input(t: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, t, H)).astype(np.float32)


def test_honest_replicas_agree_and_every_step_is_verified():
    """When primary and replica are honest and R = 1, then each step's output is the
    primary's, the verified position follows the chain, and both earn agreements."""
    a, b = worker("a"), worker("b")
    verifier = InMemoryVerifier([b], rate=1.0)
    chain = chain_of(a)
    prompt = step_input(5)
    out = run(verifier.forward(chain, prompt))
    np.testing.assert_array_equal(out, honest(prompt))
    assert verifier.verified_position == 5
    run(verifier.forward(chain, step_input(1, 1)))
    assert verifier.verified_position == 6
    assert verifier.record.agreements == {a.node_id: 2, b.node_id: 2}


def test_a_lying_primary_is_named_by_a_third_replica_and_banned_for_life():
    """When the primary lies and a third replica agrees with the replica, then the check
    raises OutputMismatch at the first lying position, naming only the primary, who is
    banned for as long as the client lives."""
    lying, b, c = worker("liar", liar), worker("b"), worker("c")
    verifier = InMemoryVerifier([b, c], rate=1.0)
    with pytest.raises(OutputMismatch) as caught:
        run(verifier.forward(chain_of(lying), step_input(4)))
    assert caught.value.position == 0 and caught.value.liars == {lying.node_id}
    assert verifier.bans.liars == {lying.node_id}
    verifier.recovery.clock.advance(10**6)
    assert verifier.bans.is_banned(lying.node_id)


def test_without_a_third_replica_the_record_of_checks_decides():
    """When a replica lies and no third replica exists, then the side with the better record
    of past agreements is believed: the replica is the liar."""
    a, lying = worker("a"), worker("liar2", liar)
    record = TrustRecord()
    record.agreed({a.node_id})
    verifier = InMemoryVerifier([lying], rate=1.0, record=record)
    with pytest.raises(OutputMismatch) as caught:
        run(verifier.forward(chain_of(a), step_input(3)))
    assert caught.value.liars == {lying.node_id}
    tie = InMemoryVerifier([worker("liar3", liar)], rate=1.0)
    with pytest.raises(OutputMismatch) as both:
        run(tie.forward(chain_of(worker("d")), step_input(3)))
    assert len(both.value.liars) == 2


def test_with_a_low_rate_the_final_check_catches_what_steps_did_not():
    """When R is low, then steps return unchecked, and the final check finds the first
    position where the primary lied (everything before it stays verified)."""
    honest_until = {"n": 3}

    def late_liar(x):
        honest_until["n"] -= 1
        return honest(x) if honest_until["n"] >= 0 else liar(x)

    lying, b, c = worker("late", late_liar), worker("b"), worker("c")
    verifier = InMemoryVerifier([b, c], rate=0.0)
    chain = chain_of(lying)
    run(verifier.forward(chain, step_input(4)))  # position 0-3, honest
    for seed in range(1, 5):
        run(verifier.forward(chain, step_input(1, seed)))  # 4, 5 honest; 6, 7 lies
    with pytest.raises(OutputMismatch) as caught:
        run(verifier.check(chain))
    assert caught.value.position == 6 and caught.value.liars == {lying.node_id}


def test_a_span_without_a_second_replica_goes_unverified():
    """When no other worker serves the span, then steps go through unchecked."""
    verifier = InMemoryVerifier([], rate=1.0)
    chain = chain_of(worker("alone", liar))
    run(verifier.forward(chain, step_input(2)))
    assert verifier.verified_position == 2 and verifier.bans.liars == set()


def test_tolerance_fits_the_dtype_and_nan_is_a_mismatch():
    """When outputs differ by rounding of their dtype, then they agree; by their own scale,
    or NaN, then they do not."""
    x = step_input(3)
    assert tolerance("float32") < tolerance("bfloat16")
    assert first_mismatch(x, x * (1 + 1e-6), tolerance("float32")) is None
    assert first_mismatch(x, x + x.std() * step_input(3, 9), tolerance("float32")) == 0
    broken = x.copy()
    broken[0, 2, 0] = np.nan
    assert first_mismatch(broken, x, tolerance("bfloat16")) == 2


def test_measured_speed_is_in_the_unit_of_announced_throughput():
    """When a worker's 1-token steps over its whole 6-block span take 0.1 s, then its measured
    throughput is 10 tokens/s, whatever it announces."""
    record = TrustRecord()
    record.step_took(b"w" * 32, blocks=6, tokens=1, seconds=0.1, span_length=6)
    assert record.throughputs()[b"w" * 32] == pytest.approx(10.0)


def test_the_cli_default_rate_is_the_librarys():
    """When ``meshnode generate`` states its default --verify-rate, then it is the verify
    module's (it keeps its own copy so that parsing options does not load the client)."""
    from meshnode.client.verify import DEFAULT_VERIFY_RATE
    from meshnode.commands import generate

    assert generate.DEFAULT_VERIFY_RATE == DEFAULT_VERIFY_RATE > 0
