"""Many generations from one client process, and cancellation, through 2 worker processes.

The client drives every generation from the reactor thread; only the head's
JAX work goes to its one compute thread. So 64 generations at once hold no
thread each: the process's thread count stays bounded while they run, and
each output is what the same generation gives alone.
"""

from __future__ import annotations

import threading

import psutil
import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.model.sampling import SamplingOptions
from tests.mesh.mesh_helpers import prompts, with_timeout

pytestmark = pytest.mark.slow

SPANS = ("0:3", "3:6")
CONCURRENT = 64
NEW_TOKENS = 12
#: Python threads (reactor/main, compute thread, ...) allowed at any time
MAX_PYTHON_THREADS = 16
#: native threads allowed beyond those the process had before the generations (JAX's own
#: pools, sized by the core count, are there from the first JAX call and do not grow)
MAX_EXTRA_NATIVE_THREADS = 16
#: seconds between thread-count samples on the reactor
SAMPLE_EVERY = 0.005


@pytest.fixture(scope="module")
def two_workers(tiny_checkpoint, tmp_path_factory):
    from meshnode.testing.processes import LocalMesh

    mesh = LocalMesh(str(tiny_checkpoint), root=tmp_path_factory.mktemp("two-workers"))
    try:
        mesh.start_bootstrap()
        mesh.start_workers(SPANS)
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def client(two_workers, tiny_checkpoint):
    from twisted.internet import reactor

    from meshnode.client.api import MeshClient

    client = MeshClient(reactor, [two_workers.join_address], str(tiny_checkpoint))
    pytest_twisted.blockon(client.start().addTimeout(120, reactor))
    pytest_twisted.blockon(client.wait_for_route(60).addTimeout(120, reactor))
    yield client
    pytest_twisted.blockon(client.close())


def options_for(index: int) -> GenerationOptions:
    """Greedy for even indices, seeded sampling for odd ones (each its own random stream)."""
    if index % 2 == 0:
        return GenerationOptions(max_new_tokens=NEW_TOKENS)
    sampling = SamplingOptions(temperature=0.8, top_k=20, top_p=0.9, seed=index)
    return GenerationOptions(max_new_tokens=NEW_TOKENS, sampling=sampling)


class ThreadSampler:
    """Samples the process's thread counts on the reactor thread, periodically."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.python: list[int] = []
        self.native: list[int] = []

    def sample(self) -> None:
        self.python.append(threading.active_count())
        self.native.append(self.process.num_threads())


async def worker_sessions(client) -> list[int]:
    """The ``sessions`` figure of every worker's ``infer.info`` now."""
    from twisted.internet import reactor

    from meshnode.inference import messages

    records = await with_timeout(client.block_records(), reactor)
    addresses = {info.address for infos in records.values() for info in infos.values()}
    counts = []
    for address in sorted(addresses):
        from meshnode.identity import PeerAddress

        reply = await with_timeout(
            client.endpoint.request(PeerAddress.parse(address), messages.build_info()), reactor
        )
        counts.append(reply.fields["sessions"])
    return counts


@pytest_twisted.ensureDeferred
async def test_sixty_four_concurrent_generations_equal_their_solo_runs(client, tiny_local):
    """When 64 generations (half greedy, half seeded sampling) run at once from one client
    process, then each equals the same generation run alone, the greedy ones equal local
    generation, and the thread counts stay under fixed bounds the whole time."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import DeferredList

    batch = prompts(CONCURRENT, 128, seed=64)
    solo = []
    for i, ids in enumerate(batch):
        result = await with_timeout(client.generate_ids(ids, options_for(i)), reactor)
        solo.append(list(result.token_ids))

    sampler = ThreadSampler()
    sampler.sample()
    native_before = sampler.native[0]
    loop = task.LoopingCall(sampler.sample)
    loop.clock = reactor
    looping = loop.start(SAMPLE_EVERY)
    in_flight, peak = [0], [0]

    def on_token(tokens: list[int]):
        def seen(token: int) -> None:
            if not tokens:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            tokens.append(token)
            if len(tokens) == NEW_TOKENS:
                in_flight[0] -= 1
            sampler.sample()

        return seen

    streamed = [[] for _ in batch]
    try:
        running = [
            client.generate_ids(ids, options_for(i), on_token(streamed[i]))
            for i, ids in enumerate(batch)
        ]
        outcomes = await with_timeout(
            DeferredList(running, fireOnOneErrback=True, consumeErrors=True), reactor, 600
        )
    finally:
        loop.stop()
        await looping

    together = [list(result.token_ids) for _, result in outcomes]
    assert together == solo
    assert streamed == solo
    for i, ids in enumerate(batch[::2]):
        local = tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS)
        assert solo[2 * i] == list(local.token_ids)
    assert peak[0] > 1  # they did run at once
    assert len(sampler.python) > CONCURRENT * NEW_TOKENS
    assert max(sampler.python) <= MAX_PYTHON_THREADS
    assert max(sampler.native) - native_before <= MAX_EXTRA_NATIVE_THREADS
    print(
        f"\n{CONCURRENT} at once: peak {peak[0]} streaming together; threads: python max "
        f"{max(sampler.python)}, native {native_before} before, max {max(sampler.native)}"
    )


@pytest_twisted.ensureDeferred
async def test_cancel_from_on_token_closes_the_sessions_on_every_worker(client):
    """When a generation's Deferred is cancelled from its on_token callback, then it fails
    with CancelledError, no more tokens come, and every worker's session count is back to
    what it was before (its sessions were closed on both workers)."""
    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError

    before = await worker_sessions(client)
    seen: list[int] = []
    running = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == 3:
            running[0].cancel()

    running.append(client.generate_ids([5, 6, 7], GenerationOptions(max_new_tokens=200),
                                       on_token))
    with pytest.raises(CancelledError):
        await with_timeout(running[0], reactor)
    assert len(seen) == 3
    assert await worker_sessions(client) == before


@pytest_twisted.ensureDeferred
async def test_cancel_from_outside_stops_the_generation_and_frees_its_sessions(client):
    """When a generation is cancelled from another event (as an HTTP server does when its
    client goes away), then it fails with CancelledError, stops producing tokens, and the
    workers' session counts drop back (a step in flight finishes on its worker first)."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import CancelledError

    before = await worker_sessions(client)
    seen: list[int] = []
    running = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == 3:
            reactor.callLater(0, running[0].cancel)

    running.append(client.generate_ids([9, 8, 7], GenerationOptions(max_new_tokens=200),
                                       on_token))
    with pytest.raises(CancelledError):
        await with_timeout(running[0], reactor)
    stopped_at = len(seen)
    assert stopped_at < 200
    # a step cancelled on the client may still be running on its worker: its session is
    # freed when that step ends, so poll (bounded) for the count to come back
    for _ in range(200):
        if await worker_sessions(client) == before:
            break
        await task.deferLater(reactor, 0.02)
    assert await worker_sessions(client) == before
    assert len(seen) == stopped_at
