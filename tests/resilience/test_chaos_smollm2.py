"""Chaos on the real model: a SmolLM2 worker SIGKILLed mid-answer, its span replayed elsewhere.

Three worker processes serve SmolLM2's 30 blocks twice over: 0-14, 15-29, and
all of them. The client goes through the two halves; at a seeded decode step
the worker of blocks 15-29 is killed, and the client must rebuild that span's
cache on the third worker (blocks 15-29 of its 0-29) by replaying what it had
sent, then finish with exactly the local greedy answer.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.client.routing.route import Route, RouteHop
from meshnode.inference.records import BlockSpan
from meshnode.model.decoding import prompt_token_ids
from tests.resilience.resilience_helpers import make_client, pinned_hop, start_mesh, with_timeout

SPANS = ("0:15", "15:30", "0:30")
QUESTION = "What is the capital of France?"
NEW_TOKENS = 12
SEED = 15


@pytest.fixture(scope="module")
def smollm2_mesh(tmp_path_factory):
    mesh = start_mesh("smollm2", list(SPANS), tmp_path_factory.mktemp("chaos-smollm2"))
    client = None
    try:
        client = make_client(mesh, "smollm2", step_timeout=30.0)
        yield mesh, client
    finally:
        if client is not None:
            pytest_twisted.blockon(client.close())
        mesh.stop()


def hop(node, worker_span: str, used: str, model: str) -> RouteHop:
    return pinned_hop(node.address, BlockSpan.parse(worker_span), BlockSpan.parse(used), model)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_smollm2_worker_killed_mid_answer(smollm2_mesh):
    """When the worker of blocks 15-29 is SIGKILLed at a seeded decode step, then the answer
    is still exactly the local greedy one (it names Paris), with that span moved to the
    worker of all blocks."""
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    mesh, client = smollm2_mesh
    first, second, whole = mesh.workers()
    model = client.source.fingerprint
    route = Route((hop(first, "0:15", "0:15", model), hop(second, "15:30", "15:30", model)), 0.0)
    # the answer ("The capital of France is Paris.") is 8 tokens: kill within its first 6
    step = int(np.random.default_rng(SEED).integers(1, 7))
    seen = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == step:
            second.signal(signal.SIGKILL)
            second.process.wait(30)

    options = GenerationOptions(max_new_tokens=NEW_TOKENS, chat=True)
    ids = prompt_token_ids(client.tokenizer, QUESTION, chat=True)
    result = await with_timeout(client.generate_ids(ids, options, on_token, route), 300)
    assert len(seen) > step, "the kill came after the last decode step"
    assert client.bans.strikes(second.address.node_id) == 1  # (the ban itself lapses in 15 s)
    assert client.bans.strikes(whole.address.node_id) == 0
    local = LocalModel.load(open_model("smollm2")).generate(
        QUESTION, chat=True, max_new_tokens=NEW_TOKENS
    )
    assert list(result.token_ids) == list(local.token_ids)
    assert "Paris" in client.tokenizer.decode(list(result.token_ids))
    assert not second.alive()
