"""SmolLM2 over three worker processes (blocks 0-9, 10-19, 20-29) on loopback TLS.

Greedy parity with local generation, bytes per decode step, 16 concurrent
sessions, and the errors a bad client gets while others are served.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from meshnode.client.chain import InferenceChain
from meshnode.client.generate import GenerationOptions
from meshnode.errors import RemoteError
from meshnode.identity import Identity, PeerAddress
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from tests.mesh.mesh_helpers import prompts, with_timeout

HIDDEN = 576
#: frame prefix + CBOR header of an infer.step: well under this many bytes
STEP_OVERHEAD = 512


def reactor():
    from twisted.internet import reactor as installed

    return installed


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chat_answer_matches_local(smollm2_client, smollm2_local):
    """When the capital of France is asked through the mesh, then the greedy answer says Paris
    and its tokens equal local generation's."""
    options = GenerationOptions(max_new_tokens=16, chat=True)
    result = await with_timeout(
        smollm2_client.generate("What is the capital of France?", options), reactor()
    )
    local = smollm2_local.generate("What is the capital of France?", chat=True, max_new_tokens=16)
    assert list(result.token_ids) == list(local.token_ids)
    assert "Paris" in result.text
    assert [hop["span"] for hop in result.route] == [[0, 10], [10, 20], [20, 30]]


@pytest.mark.slow
@pytest.mark.parametrize("forwarding", [False, True], ids=["client-driven", "forwarding"])
@pytest_twisted.ensureDeferred
async def test_decode_step_sends_only_the_new_position(smollm2_client, forwarding):
    """When a decode step goes through the chain, then each worker receives about H x 4 bytes
    (one position), not the whole sequence; with forwarding, the client sends that to the
    first worker only (with the capabilities of the others), asks the others for their
    outputs without a tensor, and still gets every worker's output."""
    client = smollm2_client
    route = await with_timeout(client.find_route(64), reactor())
    chain = InferenceChain(client.endpoint, route, client.source.fingerprint, 64,
                           forwarding=forwarding)
    await with_timeout(chain.open(), reactor())
    try:
        prompt = np.random.default_rng(0).standard_normal((1, 20, HIDDEN)).astype(np.float32)
        await with_timeout(chain.forward(prompt), reactor())
        before = [client.endpoint.stats_for(h.node_id).bytes_sent for h in route.hops]
        received = [client.endpoint.stats_for(h.node_id).bytes_received for h in route.hops]
        await with_timeout(chain.forward(prompt[:, -1:]), reactor())
        for i, hop in enumerate(route.hops):
            stats = client.endpoint.stats_for(hop.node_id)
            sent = stats.bytes_sent - before[i]
            answer = stats.bytes_received - received[i]
            if not forwarding:
                assert HIDDEN * 4 <= sent <= HIDDEN * 4 + STEP_OVERHEAD
            elif i == 0:
                later = len(route.hops) - 1
                assert HIDDEN * 4 <= sent <= HIDDEN * 4 + STEP_OVERHEAD * (1 + later)
            else:
                assert sent <= STEP_OVERHEAD
            assert HIDDEN * 4 <= answer <= HIDDEN * 4 + STEP_OVERHEAD
        assert [len(s.history) for s in chain.sessions] == [2, 2, 2]
        assert chain.sessions[1].inputs().shape == (1, 21, HIDDEN)
    finally:
        await with_timeout(chain.close(), reactor())


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sixteen_concurrent_sessions(smollm2_client, smollm2_local):
    """When 16 different prompts run at once through the same three workers, then every
    output equals its local greedy result."""
    batch = prompts(16, 49152, seed=11)
    options = GenerationOptions(max_new_tokens=6)
    running = [smollm2_client.generate_ids(ids, options) for ids in batch]
    results = await with_timeout(
        DeferredList(running, fireOnOneErrback=True, consumeErrors=True), reactor(), 300
    )
    for ids, (_, result) in zip(batch, results):
        local = smollm2_local.generate(prompt_ids=ids, max_new_tokens=6)
        assert list(result.token_ids) == list(local.token_ids)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_errors_while_others_are_served(smollm2_client, smollm2_local):
    """When a client sends bad requests, then each gets its named error, and meanwhile
    another client's generation goes on and equals local generation."""
    from meshnode.wire.endpoint import Endpoint

    route = await with_timeout(smollm2_client.find_route(64), reactor())
    first = route.hops[0]
    address = PeerAddress.parse(first.address)
    fingerprint = smollm2_client.source.fingerprint
    good_ids = prompts(1, 49152, seed=21)[0]
    good = smollm2_client.generate_ids(good_ids, GenerationOptions(max_new_tokens=8))

    bad = Endpoint(reactor(), Identity.ephemeral())
    try:

        async def error_of(message) -> str:
            try:
                await with_timeout(bad.request(address, message), reactor())
            except RemoteError as exc:
                return exc.code
            return "no error"

        span = first.span
        opened = await with_timeout(
            bad.request(address, messages.build_open(fingerprint, span, 32)), reactor()
        )
        session = opened.fields["session"]
        wide = np.zeros((1, 1, HIDDEN + 1), np.float32)
        hidden = np.zeros((1, 1, HIDDEN), np.float32)
        assert await error_of(messages.build_step(b"\0" * 16, span, 0, hidden)) == "unknown_session"
        assert await error_of(messages.build_step(session, span, 0, wide)) == "bad_tensor"
        assert (
            await error_of(messages.build_step(session, span, 0, hidden.astype(np.int32)))
            == "bad_tensor"
        )
        assert (
            await error_of(messages.build_open(fingerprint, BlockSpan(0, 30), 32))
            == "span_not_served"
        )
        assert await error_of(messages.build_open(fingerprint, span, 10**6)) == "length_limit"
        assert (
            await error_of(
                messages.build_step(session, span, 0, np.zeros((1, 40, HIDDEN), np.float32))
            )
            == "length_limit"
        )
        await with_timeout(bad.request(address, messages.build_close(session)), reactor())
        assert await error_of(messages.build_step(session, span, 0, hidden)) == "unknown_session"
    finally:
        await bad.close()
    result = await with_timeout(good, reactor())
    local = smollm2_local.generate(prompt_ids=good_ids, max_new_tokens=8)
    assert list(result.token_ids) == list(local.token_ids)
