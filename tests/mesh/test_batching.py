"""Continuous batching on a worker, with the tiny model in-process: sessions that share
iterations compute bit for bit what each computes alone, and the cache budget, closes
and failures behave as they did with one cache per session."""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.errors import NoCapacity, UnknownSession
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.model.generate import LocalBlocks, LocalModel
from meshnode.model.head import ClientHead
from meshnode.model.source import open_model
from meshnode.wire.message import PeerInfo
from tests.mesh.batching_helpers import GreedySession, make_worker, run_together
from tests.mesh.mesh_helpers import TINY_LAYERS

SPAN = BlockSpan(0, TINY_LAYERS)
PEERS = [PeerInfo(bytes([i + 1]) * 32, "127.0.0.1", 1000 + i) for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    source = open_model(str(tiny_checkpoint))
    head = ClientHead(source.config, source.load_client_params(np.float32), np.float32)
    return source, head


@pytest.fixture(scope="module")
def local(tiny):
    return LocalModel.load(tiny[0], np.float32)


def sessions_of(count: int, long_prompt: int = 0) -> list[GreedySession]:
    """``count`` generations of different clients, prompt lengths and token counts; the
    first has a ``long_prompt`` (several chunks) when given."""
    rng = np.random.default_rng(count)
    made = []
    for i in range(count):
        length = long_prompt if (i == 0 and long_prompt) else 1 + (i * 13) % 40
        prompt = [int(t) for t in rng.integers(0, 128, length)]
        made.append(GreedySession(PEERS[i % len(PEERS)], prompt, 2 + i % 5, SPAN))
    return made


def local_hidden(local, head, session: GreedySession) -> list[np.ndarray]:
    """The hidden states of ``session``'s steps (its prompt, then each token it fed back)
    through local generation's blocks."""
    blocks = LocalBlocks(local.runner, len(session.prompt) + session.new_tokens)
    steps = [session.prompt] + [[token] for token in session.tokens[: len(session.hidden) - 1]]
    outs, position = [], 0
    for ids in steps:
        outs.append(np.asarray(blocks(np.asarray(head.embed([ids])), position)))
        position += len(ids)
    return outs


def alone(tiny, session: GreedySession) -> GreedySession:
    """The same generation on a fresh worker of its own."""
    source, head = tiny
    worker = make_worker(source, SPAN)
    solo = GreedySession(session.peer, session.prompt, session.new_tokens, SPAN)
    solo.open(worker, max_length=512)
    run_together(worker, head, [solo])
    return solo


@pytest.mark.parametrize("count", [1, 2, 7, 16])
def test_sessions_sharing_iterations_match_each_alone(tiny, local, count):
    """When N sessions (different clients, prompt lengths and positions, one prompt long
    enough for chunks when N > 1) step through one worker together, then every hidden
    state each gets is bitwise what it gets alone and what local generation's blocks
    compute, and its greedy tokens are those of local generation."""
    source, head = tiny
    worker = make_worker(source, SPAN)
    sessions = sessions_of(count, long_prompt=300 if count > 1 else 0)
    for session in sessions:
        session.open(worker, max_length=512)
    run_together(worker, head, sessions)
    assert worker.scheduler.last_rows >= 1
    for session in sessions:
        assert session.error is None
        solo = alone(tiny, session)
        assert len(solo.hidden) == len(session.hidden)
        for together, by_itself in zip(session.hidden, solo.hidden):
            assert np.array_equal(together, by_itself)
        for together, locally in zip(session.hidden, local_hidden(local, head, session),
                                     strict=True):
            assert np.array_equal(together, locally)
        expected = local.generate(prompt_ids=session.prompt, max_new_tokens=session.new_tokens)
        assert session.tokens == list(expected.token_ids)


def test_sessions_joining_at_different_times_mix_prefill_and_decode(tiny):
    """When sessions open and send their prompts while others are decoding, then prefill
    chunks and decode rows share iterations and each session still matches itself alone."""
    source, head = tiny
    worker = make_worker(source, SPAN)
    sessions = sessions_of(5)
    for session in sessions:
        session.new_tokens = 6
        session.open(worker, max_length=512)
    running: list[GreedySession] = []
    for late in sessions:  # one more session joins at each round
        running.append(late)
        outcomes = [(s, s.send(worker, head)) for s in running if not s.finished]
        worker.thread.run_all()
        for session, outcome in outcomes:
            session.receive(outcome, head)
    run_together(worker, head, sessions)
    for session in sessions:
        solo = alone(tiny, session)
        assert all(np.array_equal(a, b) for a, b in zip(session.hidden, solo.hidden))
        assert session.tokens == solo.tokens


def test_the_cache_budget_and_no_capacity_are_as_before(tiny):
    """When a worker's budget holds two sessions' pages, then a third open is refused with
    no_capacity, and once one closes a new one opens and finds its pages."""
    source, head = tiny
    worker = make_worker(source, SPAN, cache_tokens=512)
    first, second, third = (GreedySession(PEERS[i], [1, 2, 3], 2, SPAN) for i in range(3))
    first.open(worker)
    second.open(worker)
    with pytest.raises(NoCapacity):
        worker.handlers.open(PEERS[2], messages.build_open("fp", SPAN, 256))
    worker.handlers.close(PEERS[0], messages.build_close(first.session_id))
    assert worker.compute.shared.allocator.free == 4
    third.open(worker)
    run_together(worker, head, [second, third])
    assert second.error is None and third.error is None
    assert worker.compute.shared.allocator.free == 0


@pytest.mark.parametrize("ending", ["closed", "timed out"])
def test_a_session_ended_mid_batch_frees_its_pages_when_the_batch_ends(tiny, ending):
    """When a session is closed, or outlives its max age, while its step runs in a batch
    with others, then the others' outputs are those they get alone, and its pages come
    back after the batch."""
    source, head = tiny
    worker = make_worker(source, SPAN, cache_tokens=1024)
    sessions = sessions_of(3)
    for session in sessions[1:2]:
        session.open(worker)
    worker.clock.advance(worker.table.max_age - 1)  # the others open later: they stay
    for session in sessions[0:1] + sessions[2:]:
        session.open(worker)
    free_before = worker.compute.shared.allocator.free

    def close_the_second(worker):
        if ending == "closed":
            worker.handlers.close(sessions[1].peer,
                                  messages.build_close(sessions[1].session_id))
        else:
            worker.clock.advance(1)
            expired = worker.table.expire_idle()
            assert [s.session_id for s in expired] == [sessions[1].session_id]
        assert worker.compute.shared.allocator.free == free_before  # still in the batch

    outcomes = [(s, s.send(worker, head)) for s in sessions]
    close_the_second(worker)
    worker.thread.run_all()
    for session, outcome in outcomes:
        session.receive(outcome, head)
    assert worker.compute.shared.allocator.free == free_before + 4
    assert len(worker.table) == 2
    run_together(worker, head, [sessions[0], sessions[2]])
    for session in (sessions[0], sessions[2]):
        solo = alone(tiny, session)
        assert all(np.array_equal(a, b) for a, b in zip(session.hidden, solo.hidden))


def test_a_session_closed_between_its_chunks_stops_and_harms_no_one(tiny):
    """When a session is closed while the first chunk of its long prompt runs, then its step
    fails (unknown session), its pages come back, and another session decoding beside it
    computes what it computes alone."""
    source, head = tiny
    worker = make_worker(source, SPAN, cache_tokens=2048)
    long, short = sessions_of(2, long_prompt=400)
    long.open(worker, max_length=512)
    short.open(worker)
    free = worker.compute.shared.allocator.free
    long_outcome, short_outcome = long.send(worker, head), short.send(worker, head)
    worker.handlers.close(long.peer, messages.build_close(long.session_id))  # in chunk 1
    assert worker.compute.shared.allocator.free == free
    worker.thread.run_all()
    long.receive(long_outcome, head)
    short.receive(short_outcome, head)
    assert long.error.check(UnknownSession)
    assert worker.compute.shared.allocator.free == free + 8
    run_together(worker, head, [short])
    solo = alone(tiny, short)
    assert all(np.array_equal(a, b) for a, b in zip(short.hidden, solo.hidden))


def test_a_failed_call_that_took_the_cache_closes_every_session(tiny, monkeypatch):
    """When a forward fails after its donated cache is gone, then every step of that
    iteration fails, every session is closed with its pages free, and the worker serves
    new sessions over a fresh cache."""
    source, head = tiny
    worker = make_worker(source, SPAN, cache_tokens=1024)
    shared = worker.compute.shared
    sessions = sessions_of(2)
    for session in sessions:
        session.open(worker)
    runner = shared._runner_of(SPAN)

    def lose_the_cache(*args, **kwargs):
        shared.arena.k.delete()
        raise RuntimeError("device lost")

    monkeypatch.setattr(type(runner), "forward_paged", lose_the_cache)
    outcomes = [(s, s.send(worker, head)) for s in sessions]
    worker.thread.run_all()
    monkeypatch.undo()
    for session, outcome in outcomes:
        session.receive(outcome, head)
        assert session.error is not None
    assert len(worker.table) == 0 and worker.table.budget.used == 0
    assert shared.allocator.free == shared.pages - 1 and not shared.arena.lost()
    fresh = sessions_of(1)[0]
    fresh.open(worker)
    run_together(worker, head, [fresh])
    assert fresh.tokens == alone(tiny, fresh).tokens


def test_a_failed_forward_that_kept_the_cache_fails_only_its_own_steps(tiny, monkeypatch):
    """When one forward of an iteration fails before touching the cache (here the prompt
    of a session over a sub-span), then only its step fails, and the session sharing the
    iteration over the whole span gets what it gets alone."""
    source, head = tiny
    worker = make_worker(source, SPAN, cache_tokens=1024)
    part = BlockSpan(0, 3)
    whole, broken = sessions_of(2)
    broken.span = part
    whole.open(worker)
    broken.open(worker)
    runner_class = type(worker.compute.runner(SPAN))
    forward = runner_class.forward_paged

    def refuse_the_part(runner, *args, **kwargs):
        if runner.end == part.end:
            raise ValueError("no program for this span")
        return forward(runner, *args, **kwargs)

    monkeypatch.setattr(runner_class, "forward_paged", refuse_the_part)
    whole.new_tokens = 1
    outcomes = [(s, s.send(worker, head)) for s in (whole, broken)]
    worker.thread.run_all()
    monkeypatch.undo()
    for session, outcome in outcomes:
        session.receive(outcome, head)
    assert broken.error is not None and broken.error.check(ValueError)
    assert whole.error is None and worker.compute.cache_resets == 0
    solo = alone(tiny, whole)
    assert np.array_equal(whole.hidden[0], solo.hidden[0])
