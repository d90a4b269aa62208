"""Chaos: worker processes killed, stopped and frozen in the middle of generations.

Six real worker processes of a tiny random checkpoint serve every block three
times (one worker for all six blocks, two halves, three thirds). For each kill
point a seeded generator picks a prompt, a route (the client's own choice or
one of several splits), one worker on it and a decode step; when that step's
token arrives, the worker gets SIGKILL (or SIGTERM, or SIGSTOP) before the
next step is sent. The generation must complete with exactly the tokens of
local greedy generation, the victim must be banned by the client, and a
fresh process replaces the victim so that every block stays served at least
twice for the next kill point.
"""

from __future__ import annotations

import signal

import numpy as np
import psutil
import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.client.recovery import RecoveryOptions
from meshnode.client.routing.route import Route
from meshnode.errors import GenerationInterrupted, RouteNotFound
from meshnode.inference.records import BlockSpan
from tests.mesh.mesh_helpers import prompts
from tests.resilience.resilience_helpers import (
    is_ready,
    make_client,
    pinned_hop,
    poll,
    reactor,
    start_mesh,
    with_timeout,
)

SPANS = ("0:6", "0:3", "3:6", "0:2", "2:4", "4:6")
LAYERS = 6
KILL_POINTS = 10
NEW_TOKENS = 16
#: seconds a step may take (a frozen worker costs one of these)
STEP_TIMEOUT = 8.0
SEED = 20261127
#: routes the kill points go through: the client's choice, or (worker span, blocks used) hops
ROUTES = (
    None,
    (("0:6", "0:6"),),
    (("0:3", "0:3"), ("3:6", "3:6")),
    (("0:2", "0:2"), ("2:4", "2:4"), ("4:6", "4:6")),
    (("0:3", "0:1"), ("0:6", "1:5"), ("4:6", "5:6")),
    (("0:2", "0:2"), ("0:6", "2:4"), ("3:6", "4:6")),
)
#: seconds a replacement worker may take to come up
RESTART_TIMEOUT = 180.0


class Chaos:
    """Which process serves each span now, and the replacements starting up."""

    def __init__(self, mesh, client):
        self.mesh = mesh
        self.client = client
        self.serving = dict(zip(SPANS, mesh.workers()))
        self.starting: dict[str, object] = {}

    def span_of(self, node_id: bytes) -> str:
        return next(s for s, n in self.serving.items() if n.address.node_id == node_id)

    def replace(self, span: str) -> None:
        """Start a fresh worker for ``span`` (the victim is gone or going)."""
        del self.serving[span]
        self.starting[span] = self.mesh.start_worker(span, wait=False)

    def coverage(self) -> list[int]:
        counts = [0] * LAYERS
        for span in self.serving:
            for block in BlockSpan.parse(span).blocks():
                counts[block] += 1
        return counts

    async def keep_coverage(self, minimum: int = 2, spans=None) -> None:
        """Wait until every block is served by ``minimum`` ready workers, and every one of
        ``spans`` (None: all, so that the client's own route choice is known here)."""
        wanted = set(SPANS if spans is None else spans)

        def covered() -> bool:
            for span, node in list(self.starting.items()):
                if is_ready(node):
                    self.serving[span] = self.starting.pop(span)
            return min(self.coverage()) >= minimum and wanted <= set(self.serving)

        await poll(covered, RESTART_TIMEOUT, f"every block served {minimum} times")

    def route(self, hops) -> Route:
        fingerprint = self.client.source.fingerprint
        chosen = []
        for worker_span, used in hops:
            address = self.serving[worker_span].address
            chosen.append(
                pinned_hop(
                    address, BlockSpan.parse(worker_span), BlockSpan.parse(used), fingerprint
                )
            )
        return Route(tuple(chosen), 0.0)


@pytest.fixture(scope="module")
def chaos(tiny_checkpoint, tmp_path_factory):
    mesh = start_mesh(str(tiny_checkpoint), list(SPANS), tmp_path_factory.mktemp("chaos"))
    client = None
    try:
        client = make_client(mesh, str(tiny_checkpoint), STEP_TIMEOUT)
        yield Chaos(mesh, client)
    finally:
        if client is not None:
            pytest_twisted.blockon(client.close())
        mesh.stop()


def freeze(node) -> None:
    node.signal(signal.SIGSTOP)
    process = psutil.Process(node.pid)
    for _ in range(1000):
        if process.status() == psutil.STATUS_STOPPED:
            return
        process.cpu_percent()  # a syscall; SIGSTOP lands within microseconds
    raise AssertionError(f"{node.name} did not stop")


def strike(node, how: signal.Signals) -> None:
    """Deliver ``how`` and wait until it has taken effect (dead, exited or frozen)."""
    if how == signal.SIGSTOP:
        freeze(node)
        return
    node.signal(how)
    node.process.wait(30)


async def generate_with_fault(
    chaos: Chaos, ids: list[int], hops, victim_hop: int, step: int, how: signal.Signals
):
    """Generate; after token ``step``, strike the worker of hop ``victim_hop``."""
    route = None if hops is None else chaos.route(hops)
    victims = []

    def on_token(_token: int) -> None:
        nonlocal step
        if step == 0:
            used = route or chaos.client.last_route
            node_id = used.hops[victim_hop % len(used.hops)].node_id
            node = chaos.serving[chaos.span_of(node_id)]
            strike(node, how)
            victims.append((chaos.span_of(node_id), node))
        step -= 1

    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    result = await with_timeout(chaos.client.generate_ids(ids, options, on_token, route))
    assert victims, "the fault was never injected"
    return list(result.token_ids), victims[0]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigkill_at_random_decode_steps(chaos, tiny_local):
    """When, at ten seeded points, a worker on the route is SIGKILLed before a decode step,
    then every generation completes with the tokens of the fault-free run, each victim is
    banned, and replacements keep every block served at least twice."""
    rng = np.random.default_rng(SEED)
    batch = prompts(KILL_POINTS, 128, seed=SEED)
    killed_spans = set()
    for point, ids in enumerate(batch):
        hops = ROUTES[point % len(ROUTES)]
        await chaos.keep_coverage(2, None if hops is None else [h[0] for h in hops])
        victim_hop, step = int(rng.integers(0, 3)), int(rng.integers(0, NEW_TOKENS - 1))
        tokens, (span, node) = await generate_with_fault(
            chaos, ids, hops, victim_hop, step, signal.SIGKILL
        )
        expected = tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS)
        assert tokens == list(expected.token_ids), f"kill point {point} ({span}, step {step})"
        assert chaos.client.bans.strikes(node.address.node_id) == 1
        assert not node.alive()
        killed_spans.add(span)
        chaos.replace(span)
    assert len(killed_spans) >= 4  # workers of many different spans
    await chaos.keep_coverage(2)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_clean_stop_sigterm_mid_generation(chaos, tiny_local):
    """When a worker on the route is stopped cleanly (SIGTERM) mid-generation, then it
    exits, the client moves its span elsewhere and the tokens are unchanged."""
    await chaos.keep_coverage(2, ["0:3", "3:6"])
    ids = prompts(1, 128, seed=SEED + 1)[0]
    hops = (("0:3", "0:3"), ("3:6", "3:6"))
    tokens, (span, node) = await generate_with_fault(chaos, ids, hops, 1, 5, signal.SIGTERM)
    assert tokens == list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
    # twistd shuts down cleanly, then exits by the signal it got
    assert node.process.returncode == -signal.SIGTERM and span == "3:6"
    assert "Server Shut Down" in node.log_tail()
    assert chaos.client.bans.strikes(node.address.node_id) == 1
    chaos.replace(span)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_frozen_worker_sigstop_mid_generation(chaos, tiny_local):
    """When a worker on the route is frozen (SIGSTOP) mid-generation, then the step times out
    after the bounded step timeout, the client replays elsewhere and the tokens are
    unchanged; the frozen process is then resumed and killed."""
    await chaos.keep_coverage(2, ["0:2", "2:4", "4:6"])
    ids = prompts(1, 128, seed=SEED + 2)[0]
    hops = (("0:2", "0:2"), ("2:4", "2:4"), ("4:6", "4:6"))
    began = reactor().seconds()
    try:
        tokens, (span, node) = await generate_with_fault(chaos, ids, hops, 1, 3, signal.SIGSTOP)
    finally:
        for frozen in chaos.serving.values():
            if frozen.alive() and psutil.Process(frozen.pid).status() == psutil.STATUS_STOPPED:
                frozen.signal(signal.SIGCONT)
                frozen.signal(signal.SIGKILL)
    assert tokens == list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
    assert span == "2:4" and chaos.client.bans.strikes(node.address.node_id) == 1
    assert reactor().seconds() - began < STEP_TIMEOUT + 30  # one timeout, not a hang
    node.process.wait(30)
    chaos.replace(span)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_uncovered_blocks_are_named_after_a_bounded_wait(chaos, tiny_local):
    """When the last worker of blocks 4-5 dies mid-generation, then the generation fails
    with GenerationInterrupted (the tokens so far kept) caused by RouteNotFound naming blocks
    4 and 5, once the route wait is over, not a hang."""
    await chaos.keep_coverage(2)
    chaos.client.recovery_options = RecoveryOptions(route_wait=3.0)
    ids = prompts(1, 128, seed=SEED + 3)[0]
    route = chaos.route((("0:3", "0:3"), ("2:4", "3:4"), ("4:6", "4:6")))
    for span in ("0:6", "3:6"):  # the other workers of blocks 4 and 5, off the route
        strike(chaos.serving[span], signal.SIGKILL)

    seen: list[int] = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == 4:
            strike(chaos.serving["4:6"], signal.SIGKILL)

    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    began = reactor().seconds()
    with pytest.raises(GenerationInterrupted) as caught:
        await with_timeout(chaos.client.generate_ids(ids, options, on_token, route))
    assert isinstance(caught.value.__cause__, RouteNotFound)
    assert caught.value.__cause__.missing == (4, 5)
    assert caught.value.token_ids == tuple(seen) and len(seen) >= 4
    assert 3.0 <= reactor().seconds() - began < 3.0 + STEP_TIMEOUT * 2
