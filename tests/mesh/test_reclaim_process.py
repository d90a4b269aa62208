"""Throwaway identities cannot hold a worker: real worker process, real TLS on loopback.

Six fresh identities (keys cost nothing) each open a session that fills a sixth of a
worker's cache budget and never step. A real user then generates through that worker,
and is served: its open waits for the oldest throwaway session to become reclaimable
(``--reclaim-after``, default 5 s) inside its wait (``--open-wait``, default 6 s).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.errors import RemoteError
from meshnode.inference.records import BlockSpan
from meshnode.worker.precompile import MIN_SESSION_CACHE
from tests.mesh.mesh_helpers import prompts, with_timeout

pytestmark = pytest.mark.slow
THROWAWAYS = 6
# cache positions each throwaway session reserves: the least any session reserves
HELD_LENGTH = MIN_SESSION_CACHE
NEW_TOKENS = 8


@pytest_twisted.ensureDeferred
async def test_throwaway_holders_do_not_lock_out_a_real_user(
    tiny_checkpoint, tiny_local, tmp_path
):
    """When six throwaway identities hold the whole cache budget and never step, then a real
    user's generation is still served (its tokens equal local greedy), some throwaway
    sessions are reclaimed, and a throwaway stepping later is told its session was
    reclaimed."""
    from twisted.internet import reactor

    from meshnode.client.api import MeshClient
    from meshnode.identity import Identity
    from meshnode.inference import messages
    from meshnode.model.source import open_model
    from meshnode.testing.processes import LocalMesh
    from meshnode.wire.endpoint import Endpoint

    source = open_model(str(tiny_checkpoint))
    span = BlockSpan(0, source.config.num_layers)
    with LocalMesh(str(tiny_checkpoint), root=tmp_path) as mesh:
        mesh.start_bootstrap()
        worker = mesh.start_worker(
            "0:6", extra=["--cache-tokens", str(THROWAWAYS * HELD_LENGTH)])
        throwaways = [Endpoint(reactor, Identity.ephemeral()) for _ in range(THROWAWAYS)]
        client = MeshClient(reactor, [mesh.join_address], str(tiny_checkpoint))
        try:
            held = []
            for endpoint in throwaways:
                opened = await with_timeout(endpoint.request(
                    worker.address, messages.build_open(source.fingerprint, span, HELD_LENGTH)),
                    reactor)
                held.append(opened.fields["session"])
            info = await with_timeout(throwaways[0].request(worker.address,
                                                            messages.build_info()), reactor)
            assert info.fields["cache_tokens"] == 0 and info.fields["sessions"] == THROWAWAYS

            await with_timeout(client.start(), reactor, 120)
            await with_timeout(client.wait_for_route(60.0), reactor, 90)
            ids = prompts(1, 128, seed=31)[0][:8]
            local = list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
            result = await with_timeout(
                client.generate_ids(ids, GenerationOptions(max_new_tokens=NEW_TOKENS)),
                reactor, 60)
            assert list(result.token_ids) == local

            reclaimed = []
            hidden = np.zeros((1, 1, source.config.hidden_size), np.float32)
            for endpoint, session in zip(throwaways, held, strict=True):
                try:
                    await with_timeout(endpoint.request(
                        worker.address, messages.build_step(session, span, 0, hidden)), reactor)
                except RemoteError as exc:
                    assert exc.code == "unknown_session"
                    reclaimed.append(exc.message)
            assert reclaimed and all("reclaimed under cache pressure" in m for m in reclaimed)
            assert len(reclaimed) < THROWAWAYS  # only as many as the user needed
        finally:
            await client.close()
            for endpoint in throwaways:
                await endpoint.close()
