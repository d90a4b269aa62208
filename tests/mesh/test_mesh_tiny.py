"""A tiny random checkpoint served by six worker processes: parity and split invariance;
and a worker with a small cache budget refusing a session it has no room for.

Each test goes through real twistd worker processes over TLS on loopback.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.client.routing.route import Route, RouteHop, candidates_from_records
from meshnode.inference.records import BlockSpan
from tests.mesh.mesh_helpers import prompts, with_timeout

NEW_TOKENS = 12


async def workers_by_span(client) -> dict[BlockSpan, tuple[bytes, object]]:
    from twisted.internet import reactor

    records = await with_timeout(client.block_records(), reactor)
    return {
        info.span: (node_id, info) for node_id, info in candidates_from_records(records).items()
    }


def route_of(workers, *hops: tuple[str, str]) -> Route:
    """``("0:3", "0:2")``: the worker serving 0:3, used for blocks 0:2."""
    chosen = []
    for worker_span, used in hops:
        node_id, info = workers[BlockSpan.parse(worker_span)]
        chosen.append(RouteHop(node_id, info, BlockSpan.parse(used)))
    return Route(tuple(chosen), 0.0)


async def generate(client, ids, route=None):
    from twisted.internet import reactor

    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    result = await with_timeout(client.generate_ids(ids, options, route=route), reactor)
    return list(result.token_ids)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_best_route_matches_local(tiny_client, tiny_local):
    """When the client picks its own route, then greedy tokens equal local generation."""
    ids = prompts(1, 128, seed=3)[0]
    local = tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS)
    assert await generate(tiny_client, ids) == list(local.token_ids)
    assert len(local.token_ids) == NEW_TOKENS


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_split_invariance(tiny_client, tiny_local):
    """When the same prompt goes through 1, 2 or 3 worker processes, then the tokens agree,
    and equal local generation."""
    workers = await workers_by_span(tiny_client)
    routes = {
        1: route_of(workers, ("0:6", "0:6")),
        2: route_of(workers, ("0:3", "0:3"), ("3:6", "3:6")),
        3: route_of(workers, ("0:2", "0:2"), ("2:4", "2:4"), ("4:6", "4:6")),
    }
    for ids in prompts(2, 128, seed=5):
        local = list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
        outputs = {n: await generate(tiny_client, ids, route) for n, route in routes.items()}
        assert outputs == {1: local, 2: local, 3: local}


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sub_spans_of_workers(tiny_client, tiny_local):
    """When a route enters and leaves workers mid-span, then only those blocks run there and
    the tokens still equal local generation."""
    workers = await workers_by_span(tiny_client)
    route = route_of(workers, ("0:3", "0:1"), ("0:6", "1:5"), ("4:6", "5:6"))
    ids = prompts(1, 128, seed=9)[0]
    local = list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
    assert await generate(tiny_client, ids, route) == local


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_no_capacity_is_a_clear_error(tiny_checkpoint, tmp_path):
    """When a worker's cache budget is taken, then a new session gets no_capacity, and once
    a session closes, then the next open succeeds."""
    from twisted.internet import reactor

    from meshnode.errors import RemoteError
    from meshnode.identity import Identity
    from meshnode.inference import messages
    from meshnode.model.source import open_model
    from meshnode.testing.processes import LocalMesh
    from meshnode.wire.endpoint import Endpoint

    fingerprint = open_model(str(tiny_checkpoint)).fingerprint
    span = BlockSpan(0, 6)
    with LocalMesh(str(tiny_checkpoint), root=tmp_path) as mesh:
        # one session's cache (at least MIN_SESSION_CACHE positions) takes the whole budget;
        # no reclaim, no wait: the refusal itself is under test (test_reclaim.py: the policy)
        node = mesh.start_worker("0:6", extra=["--cache-tokens", "256", "--reclaim-after", "600",
                                               "--open-wait", "0"])
        client = Endpoint(reactor, Identity.ephemeral())
        try:
            first = await with_timeout(
                client.request(node.address, messages.build_open(fingerprint, span, 48)), reactor
            )
            with pytest.raises(RemoteError) as refused:
                await with_timeout(
                    client.request(node.address, messages.build_open(fingerprint, span, 32)),
                    reactor,
                )
            assert refused.value.code == "no_capacity"
            await with_timeout(
                client.request(node.address, messages.build_close(first.fields["session"])),
                reactor,
            )
            again = await with_timeout(
                client.request(node.address, messages.build_open(fingerprint, span, 32)), reactor
            )
            assert len(again.fields["session"]) == 16
        finally:
            await client.close()
