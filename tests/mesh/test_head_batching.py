"""The client batches its head: concurrent generations share each step's logits and embed
calls, and every generation's tokens are those it gives alone.

A fake head counts its calls and the rows in each; a manual compute thread runs calls
only when the test says, so advances pile up as they do while the real thread is busy.
No reactor, no processes.
"""

from __future__ import annotations

import numpy as np
import pytest
from twisted.internet.defer import Deferred, succeed

from meshnode.client.generate import (
    MAX_HEAD_BATCH,
    HeadCompute,
    cancellable,
    generate_on_chain,
)
from meshnode.client.head_batch import AdvanceQueue, rows_by_key
from meshnode.compute import ROW_BUCKETS, row_bucket
from meshnode.errors import ShapeMismatch
from meshnode.model.decoding import Generation
from meshnode.model.sampling import Sampler

VOCAB = 17


class CountingHead:
    """Embeds token t as [t]; logits favour (3 * last hidden value + 1) mod 17, per row.
    Records the rows of every call."""

    batch_invariant = True

    def __init__(self) -> None:
        self.logits_rows: list[int] = []
        self.embed_rows: list[tuple[int, int]] = []

    def embed(self, ids):
        ids = np.asarray(ids)
        self.embed_rows.append(ids.shape)
        return ids.astype(np.float32)[..., None]  # [B, T, 1]

    def logits(self, hidden):
        hidden = np.asarray(hidden)
        if hidden.ndim != 3:
            raise ShapeMismatch(f"hidden states must be [batch, length, 1], got {hidden.shape}")
        self.logits_rows.append(hidden.shape[0])
        last = hidden[:, -1, 0].astype(int)  # [B]
        return np.eye(VOCAB, dtype=np.float32)[(3 * last + 1) % VOCAB]  # [B, V]


class InlineCompute:
    def call(self, function, *args):
        return succeed(function(*args))


class ManualCompute:
    """A compute thread that runs its queued calls, in order, when ``run`` is called."""

    def __init__(self) -> None:
        self.queued: list[tuple] = []
        self.calls = 0

    def call(self, function, *args):
        d = Deferred()
        self.queued.append((function, args, d))
        return d

    def run(self) -> None:
        while self.queued:
            function, args, d = self.queued.pop(0)
            self.calls += 1
            d.callback(function(*args))


class EchoChain:
    """Returns what it is sent, at once."""

    def __init__(self) -> None:
        self.position = 0
        self.closed = False

    async def open(self):
        pass

    async def forward(self, hidden):
        self.position += hidden.shape[1]
        return hidden

    async def close(self):
        self.closed = True


def _generation(prompt, new_tokens):
    return Generation(list(prompt), max_new_tokens=new_tokens, sampler=Sampler())


def _run(head, prompts, new_tokens):
    """Start every generation at once on ``head``; their Deferreds."""
    return [
        cancellable(lambda stop, p=p, n=n: generate_on_chain(
            _generation(p, n), head, EchoChain(), None, stop))
        for p, n in zip(prompts, new_tokens, strict=True)
    ]


def _value(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


PROMPTS = [(i, (i * 5) % VOCAB, 2) for i in range(12)]
NEW_TOKENS = [6 + i % 5 for i in range(12)]  # some finish before the others


def test_concurrent_generations_share_head_calls_and_keep_their_solo_tokens():
    """When 12 generations advance at once, then the head runs far fewer logits calls than
    steps (each with several rows), prefills and decode rows are embedded in shared calls of
    one length, and every generation's tokens equal its solo run's."""
    solo = [_value(d).token_ids for d in _run(
        HeadCompute(CountingHead(), InlineCompute()), PROMPTS, NEW_TOKENS)]
    head, compute = CountingHead(), ManualCompute()
    deferreds = _run(HeadCompute(head, compute, max_batch=16), PROMPTS, NEW_TOKENS)
    compute.run()
    assert [_value(d).token_ids for d in deferreds] == solo
    steps = sum(NEW_TOKENS)
    assert steps <= sum(head.logits_rows) < 2 * steps  # padded to buckets
    assert len(head.logits_rows) <= max(NEW_TOKENS) + 1 < steps / 5
    assert max(head.logits_rows) == row_bucket(len(PROMPTS))
    decode_embeds = [shape for shape in head.embed_rows if shape[1] == 1]
    assert max(rows for rows, _ in decode_embeds) == row_bucket(len(PROMPTS))


def test_a_head_call_takes_at_most_max_head_batch_generations():
    """When 12 generations advance at once with the default cap, then no head call holds
    more than MAX_HEAD_BATCH of them, the rest go in the next call, and every generation's
    tokens still equal its solo run's."""
    solo = [_value(d).token_ids for d in _run(
        HeadCompute(CountingHead(), InlineCompute()), PROMPTS, NEW_TOKENS)]
    head, compute = CountingHead(), ManualCompute()
    deferreds = _run(HeadCompute(head, compute), PROMPTS, NEW_TOKENS)
    compute.run()
    assert [_value(d).token_ids for d in deferreds] == solo
    assert len(PROMPTS) > MAX_HEAD_BATCH
    assert max(head.logits_rows) == row_bucket(MAX_HEAD_BATCH)


def test_a_batch_is_padded_to_a_row_bucket_and_its_padding_dropped():
    """When 5 and then 3 generations advance together, then the head's calls hold 8 and 4
    rows (one program per bucket, not per batch size), and each generation gets the token
    of its own row."""
    from twisted.internet.task import Clock

    clock, head, compute = Clock(), CountingHead(), ManualCompute()
    heads = HeadCompute(head, compute, clock=clock)
    generations = [_generation(p, 4) for p in PROMPTS[:8]]
    for generation in generations:
        generation.next_input()
    values = [3, 5, 7, 11, 13, 2, 4, 6]
    advances = [heads.advance(g, np.full((1, 1, 1), v, np.float32))
                for g, v in zip(generations[:5], values, strict=False)]
    clock.advance(0)
    compute.run()
    later = [heads.advance(g, np.full((1, 1, 1), v, np.float32))
             for g, v in zip(generations[5:], values[5:], strict=True)]
    clock.advance(0)
    compute.run()
    assert head.logits_rows == [8, 4]
    tokens = [_value(d).produced.token for d in advances + later]
    assert tokens == [(3 * v + 1) % VOCAB for v in values]
    assert all(rows in ROW_BUCKETS for rows, _ in head.embed_rows)


def test_a_lone_generation_is_not_held_back():
    """When one generation runs alone, then each of its steps is one head call of one row,
    started as soon as it is asked for."""
    head, compute = CountingHead(), ManualCompute()
    (d,) = _run(HeadCompute(head, compute), [(1, 2, 3)], [4])
    compute.run()
    assert len(_value(d).token_ids) == 4
    assert head.logits_rows == [1, 1, 1, 1]


def test_a_head_without_batch_invariance_runs_one_advance_per_call():
    """When the head does not claim batch invariance (no native kernels, an accelerator),
    then every advance is its own call, so no row shares a call with another."""
    head, compute = CountingHead(), ManualCompute()
    head.batch_invariant = False
    deferreds = _run(HeadCompute(head, compute), PROMPTS[:4], NEW_TOKENS[:4])
    compute.run()
    lengths = [len(_value(d).token_ids) for d in deferreds]
    assert lengths == NEW_TOKENS[:4]
    assert set(head.logits_rows) == {1}


def test_a_bad_row_fails_only_its_own_generation():
    """When one waiting advance holds a malformed output, then that generation alone fails
    (with the head's ShapeMismatch), and the others get their tokens."""
    head, compute = CountingHead(), ManualCompute()
    heads = HeadCompute(head, compute)
    gens = [_generation((1, 2), 3), _generation((4,), 3), _generation((5,), 3)]
    firsts = [heads.first(g) for g in gens]
    compute.run()
    inputs = [_value(f).hidden for f in firsts]
    inputs[1] = inputs[1][0]  # [T, 1]: not [1, T, H]
    outcomes = [heads.advance(g, x) for g, x in zip(gens, inputs, strict=True)]
    compute.run()
    results = [_value(d) for d in outcomes]
    assert isinstance(results[1].value, ShapeMismatch)
    assert results[0].produced.token == (3 * 2 + 1) % VOCAB
    assert results[2].produced.token == (3 * 5 + 1) % VOCAB


def test_a_cancelled_advance_is_dropped_and_the_others_delivered():
    """When a waiting advance's Deferred is cancelled, then its result is dropped without an
    error and the rest of its batch is delivered."""
    head, compute = CountingHead(), ManualCompute()
    heads = HeadCompute(head, compute)
    gens = [_generation((1,), 3), _generation((2,), 3)]
    firsts = [heads.first(g) for g in gens]
    compute.run()
    outcomes = [heads.advance(g, _value(f).hidden) for g, f in zip(gens, firsts, strict=True)]
    outcomes[0].addErrback(lambda failure: None)
    outcomes[0].cancel()
    compute.run()
    assert _value(outcomes[1]).produced.token == (3 * 2 + 1) % VOCAB


def test_the_queue_hands_out_what_waits_when_the_head_is_free():
    """When items arrive while a batch runs, then they wait; the next take hands them out
    together (at most max_batch, oldest first), and a take that finds none frees the head."""
    queue = AdvanceQueue(max_batch=3)
    assert queue.add("a") is True  # free: start now
    assert queue.take() == ["a"] and queue.busy
    assert [queue.add(x) for x in "bcde"] == [False] * 4  # busy: they wait
    assert queue.take() == ["b", "c", "d"]
    assert queue.take() == ["e"]
    assert queue.take() == [] and not queue.busy
    assert queue.add("f") is True
    with pytest.raises(ValueError):
        AdvanceQueue(max_batch=0)


def test_rows_are_grouped_by_what_lets_them_share_a_call():
    """When rows are grouped by a key, then equal keys share a group in first-seen order and
    a None key stands alone."""
    assert rows_by_key([1, 3, 1, None, 2, 1], lambda x: x) == [[0, 2, 5], [1], [4], [3]]


def test_advances_of_one_reactor_turn_share_one_head_call():
    """When the head is free and the chain outputs of several generations come in one
    reactor turn, then the head waits for the end of that turn and runs them as one call."""
    from twisted.internet.task import Clock

    clock, head, compute = Clock(), CountingHead(), ManualCompute()
    heads = HeadCompute(head, compute, clock=clock)
    generations = [_generation(p, 4) for p in PROMPTS[:5]]
    for generation in generations:
        generation.next_input()
    advances = [heads.advance(g, np.full((1, 1, 1), i, np.float32))
                for i, g in enumerate(generations)]
    assert compute.queued == []  # nothing before the turn ends
    clock.advance(0)
    compute.run()
    assert head.logits_rows == [row_bucket(5)]
    assert all(_value(d).produced is not None for d in advances)
