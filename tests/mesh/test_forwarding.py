"""Forwarding over an in-memory mesh: steps pushed worker to worker, capabilities, fast failure.

The workers run their real ``infer.*`` and forwarding handlers over a fake span
(``x * 1.5 + start``); the client runs its real ``InferenceChain``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from twisted.internet.defer import Deferred

from meshnode.client.chain import LOST
from meshnode.client.recovery import BanList, RecoveryOptions, SpanRecovery
from meshnode.client.routing.route import Route
from meshnode.client.verify import LifetimeBans, TrustRecord, Verifier
from meshnode.errors import ClientError, ForwardFailed, OutputMismatch, RemoteError
from meshnode.inference import capabilities, messages
from meshnode.inference.records import BlockSpan
from tests.mesh.forwarding_helpers import (
    PUSH_TIMEOUT,
    H,
    MemoryNetwork,
    SpanFunction,
    chain_over,
    expected,
    hop,
    result_of,
)

SPANS = [BlockSpan(0, 2), BlockSpan(2, 4), BlockSpan(4, 6)]


def hidden(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, tokens, H)).astype(np.float32)


@pytest.fixture
def mesh():
    network = MemoryNetwork()
    workers = [network.worker(span) for span in SPANS]
    client = network.node()
    return network, workers, client


def opened(mesh, forwarding=True, recovery=None):
    network, workers, client = mesh
    chain = chain_over(client, [hop(node, span) for (node, _, _), span in zip(workers, SPANS)],
                       forwarding, recovery)
    result_of(chain.open())
    return chain


def test_a_forwarded_step_gives_the_chain_output_and_every_hop_input(mesh):
    """When the client forwards two steps (prefill, decode) over three hops, then it gets
    the chain's output, each hop's history holds that hop's inputs (for replay), and the
    client sent the hidden state to the first hop only."""
    network, workers, client = mesh
    chain = opened(mesh)
    for step, tokens in enumerate((3, 1)):
        x = hidden(tokens, step)
        want = expected(x, SPANS)
        np.testing.assert_array_equal(result_of(chain.forward(x)), want[-1])
        for i, session in enumerate(chain.sessions):
            np.testing.assert_array_equal(session.history[-1], want[i])
    assert [s.position for s in chain.sessions] == [4, 4, 4]
    tensors_to = {}
    for to, message in client.sent:
        tensors_to[to] = tensors_to.get(to, 0) + len(message.tensors)
    first, *later = (node.identity.node_id for node, _, _ in workers)
    assert tensors_to[first] == 2 and all(tensors_to[n] == 0 for n in later)
    assert all(w[1].compute.steps == 2 for w in workers)


def test_forwarding_and_client_driven_steps_agree(mesh):
    """When the same inputs go through a forwarding chain and a client-driven one, then
    outputs and histories are equal."""
    forwarded, driven = opened(mesh, True), opened(mesh, False)
    for step, tokens in enumerate((5, 1, 1)):
        x = hidden(tokens, step)
        np.testing.assert_array_equal(result_of(forwarded.forward(x)),
                                      result_of(driven.forward(x)))
    for a, b in zip(forwarded.sessions, driven.sessions):
        np.testing.assert_array_equal(a.inputs(), b.inputs())


def test_the_step_returns_with_the_chain_output_before_earlier_answers(mesh):
    """When the middle worker's answer to the client is slow, then the step returns with the
    last worker's output at once, positions move, and the middle hop's output (the last
    hop's input) joins the history when it comes: it is off the critical path."""
    network, workers, client = mesh
    chain = opened(mesh)
    network.slow.add(workers[1][0].identity.node_id)
    x = hidden(2)
    want = expected(x, SPANS)
    np.testing.assert_array_equal(result_of(chain.forward(x)), want[-1])
    assert [s.position for s in chain.sessions] == [2, 2, 2]
    assert isinstance(chain.sessions[2].history[-1], Deferred)
    with pytest.raises(ClientError, match="settle"):
        chain.sessions[2].inputs()
    network.clock.advance(network.SLOW)
    result_of(chain.sessions[2].settle())
    for i, session in enumerate(chain.sessions):
        np.testing.assert_array_equal(session.inputs(), want[i])


def test_an_input_that_never_comes_is_lost_not_guessed(mesh):
    """When the middle worker's answer never reaches the client (its connection drops after
    it pushed on), then the step still returns the chain's output, and the last hop's
    input for that step is marked lost: replaying that span is refused, not faked."""
    network, workers, client = mesh
    chain = opened(mesh)
    network.slow.add(workers[1][0].identity.node_id)
    network.lose = True
    x = hidden(1)
    np.testing.assert_array_equal(result_of(chain.forward(x)), expected(x, SPANS)[-1])
    network.clock.advance(network.SLOW)
    result_of(chain.sessions[2].settle())
    assert chain.sessions[2].history[-1] is LOST
    with pytest.raises(ClientError, match="lost"):
        chain.sessions[2].inputs()


def push_into(sender, session, start, capability, x):
    """``sender`` pushes ``x`` into ``session``'s hop (``capability``: any map, or None)."""
    target = messages.ForwardHop(session.address, session.session_id, session.span,
                                 capability)
    message = messages.build_push(target, start, x)
    if capability is None:
        message.fields.pop("cap")
    return sender.request(session.address, message)


def refusal(d: Deferred) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        result_of(d)
    return caught.value


def test_injected_pushes_are_refused_and_leave_the_session_alone(mesh):
    """When a third party that knows a session id pushes into it without a capability,
    with another session's, with the push key of a session it opened itself, or with a
    real one meant for another sender, then each push is refused (bad_capability), the
    session does not move, and the next legitimate step gives the right output."""
    network, workers, client = mesh
    chain, other = opened(mesh), opened(mesh)
    result_of(chain.forward(hidden(2)))
    intruder = network.node()
    own = chain_over(intruder, [hop(node, span) for (node, _, _), span in zip(workers, SPANS)])
    result_of(own.open())
    victim, before = chain.sessions[1], chain.sessions[0]
    start, x = victim.position, hidden(1, 9)
    owner, thief = client.identity.node_id, intruder.identity.node_id
    others = capabilities.issue(owner, other.sessions[1].push_key, thief, start)
    stolen_key = capabilities.issue(owner, own.sessions[1].push_key, thief, start)
    for_before = capabilities.issue(owner, victim.push_key, before.hop.node_id, start)
    codes = [refusal(push_into(intruder, victim, start, capability, x)).code
             for capability in (None, others, stolen_key, for_before)]
    assert codes == ["bad_capability"] * 4
    worker_session = workers[1][1].table.get(owner, victim.session_id)
    assert worker_session.position == start and workers[1][1].compute.steps == 1
    x = hidden(1, 3)
    np.testing.assert_array_equal(result_of(chain.forward(x)), expected(x, SPANS)[-1])


def test_a_spent_capability_cannot_be_replayed(mesh):
    """When the hop before replays a capability it was given for an earlier position, then
    the push is refused: a capability is good for one position."""
    network, workers, client = mesh
    chain = opened(mesh)
    victim, before = chain.sessions[1], chain.sessions[0]
    old = capabilities.issue(client.identity.node_id, victim.push_key, before.hop.node_id, 0)
    result_of(chain.forward(hidden(2)))
    sender = network.nodes[before.hop.node_id]
    assert refusal(push_into(sender, victim, victim.position, old, hidden(1))).code \
        == "bad_capability"


def test_a_next_hop_that_is_gone_is_named_at_once(mesh):
    """When the third hop's worker is gone (connection refused), then the step fails at
    once with ForwardFailed naming that hop, not the messenger; the hops before it have
    run and recorded their inputs, the gone one has not."""
    network, workers, client = mesh
    chain = opened(mesh)
    network.down.add(workers[2][0].identity.node_id)
    with pytest.raises(ForwardFailed) as caught:
        result_of(chain.forward(hidden(1)))
    assert caught.value.node_id == workers[2][0].identity.node_id
    assert caught.value.address == str(workers[2][0].address)
    assert [s.position for s in chain.sessions] == [1, 1, 0]


def test_a_frozen_next_hop_is_named_after_the_push_timeout_not_the_step_timeout(mesh):
    """When the second hop is frozen, then its predecessor's push times out after the
    (short) push timeout and the step fails naming the frozen hop, long before the
    client's step timeout."""
    network, workers, client = mesh
    chain = opened(mesh)
    network.frozen.add(workers[1][0].identity.node_id)
    failed = Deferred.fromCoroutine(chain.forward(hidden(1)))
    got = []
    failed.addBoth(got.append)
    network.clock.advance(PUSH_TIMEOUT)
    assert got and got[0].check(ForwardFailed)
    assert got[0].value.node_id == workers[1][0].identity.node_id
    assert got[0].value.cause_code == "timeout"


def test_a_refusing_next_hop_is_named(mesh):
    """When the next hop refuses the push (its session is gone there), then the step
    fails with ForwardFailed naming it and carrying its refusal's code."""
    network, workers, client = mesh
    chain = opened(mesh)
    victim = chain.sessions[1]
    workers[1][1].table.close(client.identity.node_id, victim.session_id)
    with pytest.raises(ForwardFailed) as caught:
        result_of(chain.forward(hidden(1)))
    assert caught.value.node_id == victim.hop.node_id
    assert caught.value.cause_code == "unknown_session"


class SpareRoute(SpanRecovery):
    """Recovery whose replacement routes go through ``spares`` (no DHT here)."""

    def __init__(self, network, client, spares):
        super().__init__(client, None, network.clock, None, "fp", BanList(network.clock),
                         RecoveryOptions(route_wait=1.0))
        self.spares = spares

    async def wait_for_span_route(self, span, max_length, deadline):
        node = self.spares.pop(0)
        return Route((hop(node, span),), 0.0)


def test_recovery_replaces_the_named_hop_and_goes_on_from_it(mesh):
    """When the second hop is gone mid-generation, then recovery bans it (not the first),
    replays its history on a spare worker, and the step goes on from there: the outputs
    are those of a chain without the fault."""
    network, workers, client = mesh
    spare, _, _ = network.worker(SPANS[1])
    recovery = SpareRoute(network, client, [spare])
    chain = opened(mesh, recovery=recovery)
    inputs = [hidden(3, 0), hidden(1, 1), hidden(1, 2)]
    result_of(chain.forward(inputs[0]))
    gone = workers[1][0].identity.node_id
    network.down.add(gone)
    for x in inputs[1:]:
        np.testing.assert_array_equal(result_of(chain.forward(x)), expected(x, SPANS)[-1])
    assert recovery.bans.strikes(gone) == 1
    assert recovery.bans.strikes(workers[0][0].identity.node_id) == 0
    assert chain.sessions[1].hop.node_id == spare.identity.node_id
    np.testing.assert_array_equal(
        chain.sessions[1].inputs(),
        np.concatenate([expected(x, SPANS)[1] for x in inputs], axis=1))


class Liar(SpanFunction):
    """A span that adds 1 to what it should answer."""

    def forward(self, span, hidden, start, cache):
        return super().forward(span, hidden, start, cache).addCallback(
            lambda done: (done[0] + 1.0, done[1]))


class ReplicaVerifier(Verifier):
    """Replicas from a fixed list of workers per span (no DHT here)."""

    def __init__(self, recovery, candidates, rate=1.0):
        clock = recovery.clock
        super().__init__(recovery, TrustRecord(), LifetimeBans(clock), rate,
                         random.Random(1), 32)
        self.candidates = candidates

    async def _other_route(self, span, exclude):
        for node, served in self.candidates:
            if served == span and node.identity.node_id not in exclude:
                return Route((hop(node, span),), 0.0)
        return None


def verified_mesh(liar: bool):
    network = MemoryNetwork()
    workers = [network.worker(span) for span in SPANS]
    if liar:
        workers[1][1].compute = Liar()
    replicas = [(network.worker(span)[0], span) for span in SPANS + [SPANS[1]]]
    client = network.node()
    verifier = ReplicaVerifier(SpareRoute(network, client, []), replicas)
    chain = chain_over(client, [hop(node, span) for (node, _, _), span in zip(workers, SPANS)],
                       True, verifier)
    result_of(chain.open())
    return workers, verifier, chain


def test_verification_mirrors_forwarded_steps_to_replicas():
    """When a verified chain forwards its steps, then each hop's input and output (as the
    client received them) are checked on a second replica, and every position is verified."""
    workers, verifier, chain = verified_mesh(liar=False)
    for step, tokens in enumerate((3, 1)):
        x = hidden(tokens, step)
        np.testing.assert_array_equal(result_of(chain.forward(x)), expected(x, SPANS)[-1])
    assert verifier.verified_position == chain.position == 4
    assert all(r is not None and r.verified == 4 for r in verifier._replicas.values())


def test_a_lying_hop_of_a_forwarded_chain_is_caught():
    """When the middle worker of a forwarded chain lies, then the check names it (a third
    replica decides) and bans it for life."""
    workers, verifier, chain = verified_mesh(liar=True)
    with pytest.raises(OutputMismatch) as caught:
        result_of(chain.forward(hidden(2)))
    liar = workers[1][0].identity.node_id
    assert caught.value.liars == frozenset({liar}) and verifier.bans.is_banned(liar)
