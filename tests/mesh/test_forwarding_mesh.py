"""Forwarding on real worker processes: client -> A -> B -> C -> client over loopback TLS.

Greedy tokens equal local generation (tiny checkpoint and SmolLM2; 2 and 3 hops;
routes through sub-spans) while the client sends hidden states to the first hop
only; a push injected by a third party is refused and the session goes on
unharmed; a worker frozen or killed mid-generation is named by the hop before
it, banned (not the messenger) and replaced, with tokens unchanged and without
waiting out the step timeout.
"""

from __future__ import annotations

import signal

import numpy as np
import psutil
import pytest
import pytest_twisted

from meshnode.client.chain import InferenceChain
from meshnode.client.generate import GenerationOptions
from meshnode.errors import RemoteError
from meshnode.identity import Identity
from meshnode.inference import capabilities, messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.endpoint import Endpoint
from tests.mesh.mesh_helpers import prompts, with_timeout
from tests.mesh.test_mesh_tiny import route_of, workers_by_span

NEW_TOKENS = 12


def reactor():
    from twisted.internet import reactor as installed

    return installed


class SentTypes:
    """Records the type of each message the client sends, and whether it carried a tensor."""

    def __init__(self, endpoint):
        self.endpoint, self.original = endpoint, endpoint.request
        self.sent: list[tuple[bytes, str, int, bool]] = []  # to, type, tensors, forward?
        endpoint.request = self.request

    def request(self, address, message, timeout=30.0):
        self.sent.append((address.node_id, message.type, len(message.tensors),
                          "forward" in message.fields))
        return self.original(address, message, timeout)

    def restore(self):
        self.endpoint.request = self.original

    def of(self, kind: str) -> list[tuple[bytes, str, int, bool]]:
        return [s for s in self.sent if s[1] == kind]


async def generate(client, ids, route=None):
    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    result = await with_timeout(client.generate_ids(ids, options, route=route), reactor())
    return list(result.token_ids)


def assert_forwarded(sent: SentTypes, route) -> None:
    """Every step went to the first hop with the rest of the route; the later hops got
    waits, never a tensor."""
    first, *later = [h.node_id for h in route.hops]
    steps = sent.of(messages.STEP)
    assert steps and all(to == first and tensors == 1 and forward
                         for to, _, tensors, forward in steps)
    waits = sent.of(messages.WAIT)
    assert {to for to, *_ in waits} == set(later)
    assert all(tensors == 0 for _, _, tensors, _ in waits)
    assert len(waits) == len(steps) * len(later)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_forwarding_gives_local_tokens_over_2_and_3_hops_and_sub_spans(
        tiny_client, tiny_local):
    """When generations go through 2 hops, 3 hops and a route entering and leaving workers
    mid-span, with forwarding on, then the tokens equal local generation and the client
    sent hidden states to the first hop only."""
    assert tiny_client.forwarding
    workers = await workers_by_span(tiny_client)
    routes = [
        route_of(workers, ("0:3", "0:3"), ("3:6", "3:6")),
        route_of(workers, ("0:2", "0:2"), ("2:4", "2:4"), ("4:6", "4:6")),
        route_of(workers, ("0:3", "0:1"), ("0:6", "1:5"), ("4:6", "5:6")),
    ]
    for index, route in enumerate(routes):
        ids = prompts(1, 128, seed=40 + index)[0]
        local = list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
        sent = SentTypes(tiny_client.endpoint)
        try:
            assert await generate(tiny_client, ids, route) == local
        finally:
            sent.restore()
        assert_forwarded(sent, route)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_smollm2_forwarded_answer_matches_local(smollm2_client, smollm2_local):
    """When SmolLM2 answers through its three workers with forwarding, then the tokens equal
    local generation's and the later workers got no tensor from the client."""
    route = await with_timeout(smollm2_client.find_route(64), reactor())
    assert len(route.hops) == 3
    options = GenerationOptions(max_new_tokens=16, chat=True)
    sent = SentTypes(smollm2_client.endpoint)
    try:
        result = await with_timeout(
            smollm2_client.generate("What is the capital of France?", options), reactor())
    finally:
        sent.restore()
    local = smollm2_local.generate("What is the capital of France?", chat=True,
                                   max_new_tokens=16)
    assert list(result.token_ids) == list(local.token_ids)
    assert_forwarded(sent, route)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_injected_pushes_are_refused_and_the_session_goes_on(tiny_client):
    """When a third party that knows a session id pushes a step into it, without a
    capability or with one of another session, then each push is refused (bad_capability),
    and the session's next steps give the outputs of an untouched chain."""
    client = tiny_client
    workers = await workers_by_span(client)
    route = route_of(workers, ("0:2", "0:2"), ("2:4", "2:4"), ("4:6", "4:6"))
    fingerprint, size = client.source.fingerprint, client.source.config.hidden_size
    chains = [InferenceChain(client.endpoint, route, fingerprint, 32, forwarding=f)
              for f in (True, True, False)]
    victim_chain, other, reference = chains
    intruder = Endpoint(reactor(), Identity.ephemeral())
    for chain in chains:
        await with_timeout(chain.open(), reactor())
    try:
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((1, t, size)).astype(np.float32) for t in (5, 1, 1)]
        await with_timeout(victim_chain.forward(inputs[0]), reactor())
        expected = await with_timeout(reference.forward(inputs[0]), reactor())
        victim = victim_chain.sessions[1]
        start = victim.position
        others = capabilities.issue(client.identity.node_id, other.sessions[1].push_key,
                                    intruder.identity.node_id, start)
        for capability in (None, others):
            hop = messages.ForwardHop(victim.address, victim.session_id, victim.span,
                                      capability or {})
            push = messages.build_push(hop, start, inputs[1])
            if capability is None:
                push.fields.pop("cap")
            with pytest.raises(RemoteError) as refused:
                await with_timeout(intruder.request(victim.address, push, 10.0), reactor())
            assert refused.value.code == "bad_capability"
        for x in inputs[1:]:
            got = await with_timeout(victim_chain.forward(x), reactor())
            expected = await with_timeout(reference.forward(x), reactor())
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert victim.position == start + 2
    finally:
        for chain in chains:
            await with_timeout(chain.close(), reactor())
        await intruder.close()


# --- faults mid-generation, on a mesh of their own -----------------------------

FAULT_SPANS = ("0:2", "2:4", "4:6", "2:4", "4:6")
#: so long that a generation finishing proves nobody waited it out
HUGE_STEP_TIMEOUT = 3600.0


@pytest.fixture(scope="module")
def fault_mesh(tiny_checkpoint, tmp_path_factory):
    from tests.resilience.resilience_helpers import make_client, start_mesh

    mesh = start_mesh(str(tiny_checkpoint), list(FAULT_SPANS), tmp_path_factory.mktemp("fwd"))
    client = None
    try:
        client = make_client(mesh, str(tiny_checkpoint), HUGE_STEP_TIMEOUT)
        yield mesh, client
    finally:
        if client is not None:
            pytest_twisted.blockon(client.close())
        for node in mesh.workers():
            if node.alive() and psutil.Process(node.pid).status() == psutil.STATUS_STOPPED:
                node.signal(signal.SIGCONT)
        mesh.stop()


def fault_route(mesh, client, victim_span: str):
    """0:2 -> 2:4 -> 4:6 through a live, unfrozen worker of each span; the victim's process."""
    from meshnode.client.routing.route import Route
    from tests.resilience.resilience_helpers import pinned_hop

    nodes = {}
    for span, node in zip(FAULT_SPANS, mesh.workers()):
        usable = node.alive() and psutil.Process(node.pid).status() != psutil.STATUS_STOPPED
        if span not in nodes and usable and not client.bans.is_banned(node.address.node_id):
            nodes[span] = node
    hops = [pinned_hop(nodes[s].address, BlockSpan.parse(s), BlockSpan.parse(s),
                       client.source.fingerprint) for s in FAULT_SPANS[:3]]
    return Route(tuple(hops), 0.0), nodes[victim_span]


def freeze(node) -> None:
    node.signal(signal.SIGSTOP)
    process = psutil.Process(node.pid)
    for _ in range(1000):
        if process.status() == psutil.STATUS_STOPPED:
            return
        process.cpu_percent()
    raise AssertionError(f"{node.name} did not stop")


@pytest.mark.slow
@pytest.mark.parametrize("victim_span, how", [("2:4", "SIGSTOP"), ("4:6", "SIGKILL")])
@pytest_twisted.ensureDeferred
async def test_a_worker_frozen_or_killed_mid_generation_is_named_and_replaced(
        fault_mesh, tiny_local, victim_span, how):
    """When, with forwarding on, the middle worker is frozen (SIGSTOP) or the last one is
    killed (SIGKILL) after the fourth token, then the generation completes with the local
    tokens although the step timeout is an hour (the failure came back fast), the victim
    is banned and the hop before it (the messenger) is not."""
    mesh, client = fault_mesh
    route, victim = fault_route(mesh, client, victim_span)
    ids = prompts(1, 128, seed=77)[0]
    tokens, struck = [], []

    def on_token(token: int) -> None:
        tokens.append(token)
        if len(tokens) == 4:
            if how == "SIGSTOP":
                freeze(victim)
            else:
                victim.signal(signal.SIGKILL)
                victim.process.wait(30)
            struck.append(victim)

    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    result = await with_timeout(client.generate_ids(ids, options, on_token, route), reactor())
    local = tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS)
    assert struck and list(result.token_ids) == list(local.token_ids)
    index = FAULT_SPANS.index(victim_span)
    messenger = route.hops[index - 1].node_id
    assert client.bans.strikes(victim.address.node_id) == 1
    assert client.bans.strikes(messenger) == 0
    assert victim.address.node_id.hex() not in {hop["worker"] for hop in result.route}
