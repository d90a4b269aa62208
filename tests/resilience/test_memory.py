"""Memory bounds of a real worker process: the cache budget, session churn, RSS at rest.

Two worker processes of a tiny checkpoint serve all six blocks: ``small`` with a
cache budget of 64 tokens, ``roomy`` with the default budget.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from meshnode.client.chain import SpanSession
from meshnode.client.generate import GenerationOptions
from meshnode.errors import RemoteError
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from tests.mesh.mesh_helpers import prompts
from tests.resilience.memory_probe import MIB, churn, direct_route, footprint, rss
from tests.resilience.resilience_helpers import make_client, start_mesh, with_timeout

SMALL_BUDGET = 256  # one session's cache (MIN_SESSION_CACHE positions at least)
ROOMY_BUDGET = 16384
SPAN = BlockSpan(0, 6)
SESSIONS = 500
WARM_SESSIONS = 50
#: resident memory of the Python + Twisted + JAX runtime of a worker, beyond weights and
#: caches (a tiny-model worker measured 393 MiB at rest on this CPU; docs/resilience.md)
RUNTIME_OVERHEAD = 512 * MIB


@pytest.fixture(scope="module")
def memory_mesh(tiny_checkpoint, tmp_path_factory):
    mesh = start_mesh(str(tiny_checkpoint), [], tmp_path_factory.mktemp("memory"))
    try:
        # no reclaim, no wait on the small one: its refusal is under test
        small = mesh.start_worker("0:6", extra=["--cache-tokens", str(SMALL_BUDGET),
                                                "--reclaim-after", "600", "--open-wait", "0"])
        # no background precompiling on the measured one: its programs landing mid-churn
        # would be counted as growth of what sessions leave behind
        roomy = mesh.start_worker("0:6", extra=["--cache-tokens", str(ROOMY_BUDGET),
                                                "--no-precompile"])
        client = make_client(mesh, str(tiny_checkpoint), step_timeout=30.0)
        yield mesh, small, roomy, client
        pytest_twisted.blockon(client.close())
    finally:
        mesh.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_full_budget_refuses_with_a_clear_error_and_the_client_falls_back(
    memory_mesh, tiny_local
):
    """When a session would overrun a worker's cache budget, then the worker refuses it with
    ``no_capacity`` saying how much is free, and a generation routed there moves to the
    other worker and still equals local greedy output."""
    _, small, _, client = memory_mesh
    model = client.source.fingerprint
    route = direct_route(small.address, SPAN, model)
    holder = SpanSession(client.endpoint, route.hops[0], 40)
    await with_timeout(holder.open(model))
    try:
        refused = SpanSession(client.endpoint, route.hops[0], 40)
        with pytest.raises(RemoteError) as caught:
            await with_timeout(refused.open(model))
        assert caught.value.code == "no_capacity"
        assert "256 cache tokens asked, 0 of 256 free" in caught.value.message
        ids = prompts(1, 128, seed=77)[0]
        options = GenerationOptions(max_new_tokens=8)
        result = await with_timeout(client.generate_ids(ids, options, route=route))
        expected = tiny_local.generate(prompt_ids=ids, max_new_tokens=8)
        assert list(result.token_ids) == list(expected.token_ids)
        assert client.bans.strikes(small.address.node_id) == 1
    finally:
        await with_timeout(holder.close())


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_session_churn_leaves_resident_memory_flat(memory_mesh, tiny_checkpoint):
    """When 500 sessions are opened, stepped and closed, then the worker's RSS after all of
    them is within 5% of its RSS after the first 50, and at rest it stays within hosted
    weights + cache budget + a fixed runtime overhead."""
    from meshnode.model.source import open_model

    _, _, roomy, client = memory_mesh
    model, hidden = client.source.fingerprint, client.source.config.hidden_size
    route = direct_route(roomy.address, SPAN, model)
    await with_timeout(churn(client.endpoint, route, model, hidden, 0, WARM_SESSIONS), 300)
    after_warm = rss(roomy.pid)
    await with_timeout(
        churn(client.endpoint, route, model, hidden, WARM_SESSIONS, SESSIONS - WARM_SESSIONS), 600
    )
    after_all = rss(roomy.pid)
    bounds = footprint(open_model(str(tiny_checkpoint)), SPAN, ROOMY_BUDGET)
    print(
        f"\nworker RSS: {after_warm / MIB:.1f} MiB after {WARM_SESSIONS} sessions, "
        f"{after_all / MIB:.1f} MiB after {SESSIONS}; weights {bounds.weights_bytes / MIB:.2f}"
        f" MiB, cache budget {bounds.cache_budget_bytes / MIB:.2f} MiB"
    )
    assert abs(after_all - after_warm) <= 0.05 * after_warm
    assert after_all <= bounds.weights_bytes + bounds.cache_budget_bytes + RUNTIME_OVERHEAD
    info = await with_timeout(client.endpoint.request(roomy.address, messages.build_info()))
    assert info.fields["sessions"] == 0 and info.fields["cache_tokens"] == ROOMY_BUDGET


def test_footprint_counts_weights_and_cache_per_token(tiny_checkpoint):
    """When the footprint of the tiny model's six blocks is computed, then the cache per token
    is layers x (K, V) x kv heads x head dim x 4 bytes and the weights are the stacked
    parameters' bytes."""
    from meshnode.model.source import open_model

    source = open_model(str(tiny_checkpoint))
    bounds = footprint(source, SPAN, 100)
    config = source.config
    assert bounds.cache_bytes_per_token == 6 * 2 * config.num_kv_heads * config.head_dim * 4
    assert bounds.cache_budget_bytes == 100 * bounds.cache_bytes_per_token
    assert bounds.weights_bytes > 6 * 3 * config.hidden_size * config.intermediate_size * 4
