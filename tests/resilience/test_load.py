"""Load: 32 concurrent sessions through three worker processes, every output checked.

The small version of ``scripts/bench_load.py``: a tiny checkpoint, 20 new
tokens each. Timings are printed, never asserted (the machine is shared).
"""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.mesh.mesh_helpers import prompts
from tests.resilience.load_probe import run_load
from tests.resilience.resilience_helpers import make_client, reactor, start_mesh, with_timeout

SPANS = ["0:2", "2:4", "4:6"]
SESSIONS = 32
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def load_mesh(tiny_checkpoint, tmp_path_factory):
    mesh = start_mesh(str(tiny_checkpoint), SPANS, tmp_path_factory.mktemp("load"))
    client = None
    try:
        client = make_client(mesh, str(tiny_checkpoint), step_timeout=60.0)
        yield mesh, client
    finally:
        if client is not None:
            pytest_twisted.blockon(client.close())
        mesh.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_thirty_two_concurrent_sessions_are_all_correct(load_mesh, tiny_local):
    """When 32 generations of 20 tokens run at once through three workers, then every one
    equals its local greedy output and all go through the three workers."""
    _, client = load_mesh
    batch = prompts(SESSIONS, 128, seed=41)
    load = await with_timeout(run_load(client, reactor(), batch, NEW_TOKENS), 600)
    for ids, tokens in zip(batch, load.tokens):
        assert tokens == list(
            tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids
        )
    assert load.total_tokens == SESSIONS * NEW_TOKENS
    assert [hop["span"] for hop in client.last_route.describe()] == [[0, 2], [2, 4], [4, 6]]
    print(
        f"\n{SESSIONS} x {NEW_TOKENS} tokens: {load.tokens_per_second:.1f} tokens/s aggregate,"
        f" p50 {1000 * load.gap_percentile(0.5):.1f} ms, "
        f"p99 {1000 * load.gap_percentile(0.99):.1f} ms per token"
    )
