"""The mesh driver of ``Generation`` as a specification: a fake chain and head, no processes.

Deferreds fire synchronously here (``succeed``) or when the test fires them,
so no reactor runs: what is checked is the order of things, what reaches the
chain, what a cancellation closes, and which error a failure raises.
"""

from __future__ import annotations

import numpy as np
import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed

from meshnode.client.generate import HeadCompute, StopRequest, cancellable, generate_on_chain
from meshnode.errors import GenerationInterrupted, RequestTimeout
from meshnode.model.decoding import Generation, generate_tokens
from meshnode.model.sampling import Sampler

VOCAB = 10


class Head:
    """Embeds token t as [t]; logits favour (the last hidden value + 1) mod 10."""

    def embed(self, ids):
        return np.asarray(ids, dtype=np.float32)[..., None]  # [1, T, 1]

    def logits(self, hidden):
        last = int(np.asarray(hidden)[0, -1, 0])
        return np.eye(VOCAB, dtype=np.float32)[[(last + 1) % VOCAB]]  # [1, V]


class InlineCompute:
    """A compute thread that runs each call at once, on the caller's thread."""

    def call(self, function, *args):
        return succeed(function(*args))


class Chain:
    """Records what it is sent; ``pending`` makes a step wait for the test."""

    def __init__(self, fail_at: int | None = None):
        self.position = 0
        self.sent: list[tuple[float, ...]] = []
        self.opened = self.closed = False
        self.fail_at = fail_at
        self.pending: Deferred | None = None
        self.hold_steps = False
        self.close_done: Deferred | None = None

    async def open(self):
        self.opened = True

    async def forward(self, hidden):
        if self.fail_at is not None and len(self.sent) == self.fail_at:
            raise RequestTimeout("infer.step: no answer in 60s")
        self.sent.append(tuple(np.asarray(hidden)[0, :, 0]))
        if self.hold_steps:
            self.pending = Deferred()
            await self.pending
        self.position += hidden.shape[1]
        return hidden

    async def close(self):
        if self.close_done is not None:
            await self.close_done
        self.closed = True


def generation(max_new_tokens=5, stop_ids=frozenset()):
    return Generation([3, 1, 4], max_new_tokens=max_new_tokens, sampler=Sampler(),
                      stop_ids=frozenset(stop_ids))


def run(gen, chain, on_token=None, text_of=lambda ids: ""):
    head = HeadCompute(Head(), InlineCompute())
    return cancellable(
        lambda stop: generate_on_chain(gen, head, chain, on_token, stop, text_of)
    )


def outcome(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_the_chain_gets_the_prompt_then_each_new_token_and_the_result_is_the_local_one():
    """When a generation is driven through a chain, then the chain is sent the prompt's
    embeddings and then each new token's, on_token sees every token in order, the chain is
    closed, and the tokens and stop reason equal the synchronous driver's over the same
    model."""
    chain, seen = Chain(), []
    result = outcome(run(generation(max_new_tokens=5), chain, seen.append))
    assert chain.sent == [(3.0, 1.0, 4.0), (5.0,), (6.0,), (7.0,), (8.0,)]
    assert seen == [5, 6, 7, 8, 9]
    assert chain.opened and chain.closed
    local = generate_tokens(Head(), lambda h, start: h, [3, 1, 4], max_new_tokens=5,
                            sampler=Sampler())
    assert (result.token_ids, result.stop_reason) == (local.token_ids, local.stop_reason)


def test_an_eos_token_ends_the_generation_through_the_chain():
    """When the model produces a stop id, then the generation ends there."""
    chain = Chain()
    result = outcome(run(generation(max_new_tokens=50, stop_ids={7}), chain))
    assert result.token_ids == (5, 6, 7) and result.stop_reason == "eos"


def test_cancel_from_on_token_stops_before_the_next_step_and_closes():
    """When the Deferred is cancelled inside on_token (the coroutine is running then, not
    waiting), then no further step is sent, the chain is closed, and it fails with
    CancelledError."""
    chain, seen = Chain(), []
    holder: list[Deferred] = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 2:
            holder[0].cancel()

    chain.hold_steps = True  # so on_token first runs once the Deferred exists
    holder.append(run(generation(max_new_tokens=50), chain, on_token))
    chain.pending.callback(None)  # the prefill's answer
    chain.pending.callback(None)  # the first decode step's answer: on_token cancels
    result = outcome(holder[0])
    assert isinstance(result.value, CancelledError)
    assert seen == [5, 6]
    assert len(chain.sent) == 2
    assert chain.closed


def test_cancel_during_a_step_cancels_it_and_fails_only_after_the_sessions_are_closed():
    """When the Deferred is cancelled while a step is in flight, then that step is
    cancelled, the chain closes, and only once the close is done does the Deferred fail
    with CancelledError."""
    chain = Chain()
    chain.hold_steps = True
    chain.close_done = Deferred()
    d = run(generation(max_new_tokens=50), chain)
    step = chain.pending
    d.cancel()
    assert step.called  # the step in flight was cancelled
    results = []
    d.addBoth(results.append)
    assert results == []  # still closing
    chain.close_done.callback(None)
    assert chain.closed
    assert isinstance(results[0].value, CancelledError)


def test_a_failure_after_tokens_raises_generation_interrupted_with_them():
    """When a step fails after tokens came out, then GenerationInterrupted carries those
    tokens and their text, its cause is the failure, and the chain is closed."""
    chain = Chain(fail_at=3)
    failure = outcome(run(generation(max_new_tokens=50), chain,
                          text_of=lambda ids: "-".join(map(str, ids))))
    error = failure.value
    assert isinstance(error, GenerationInterrupted)
    assert error.token_ids == (5, 6, 7) and error.text == "5-6-7"
    assert isinstance(error.__cause__, RequestTimeout)
    assert error.code == RequestTimeout.code
    assert chain.closed


def test_a_failure_before_any_token_raises_the_cause_itself():
    """When the prefill fails, then the cause is raised as is."""
    chain = Chain(fail_at=0)
    failure = outcome(run(generation(), chain))
    assert isinstance(failure.value, RequestTimeout)
    assert chain.closed


def test_a_stop_request_is_seen_between_steps():
    """When a stop was requested, then check() raises CancelledError; before, it does not."""
    stop = StopRequest()
    stop.check()
    stop.requested = True
    with pytest.raises(CancelledError):
        stop.check()


def test_an_interrupted_generation_is_still_of_its_causes_kind():
    """When a generation fails after tokens with RouteNotFound, then the error is both a
    GenerationInterrupted (with the tokens) and a RouteNotFound with its missing blocks, its
    code and its message."""
    from meshnode.client.generate import interrupted
    from meshnode.errors import RemoteError, RouteNotFound

    error = interrupted(RouteNotFound("no eligible worker serves blocks 4-5", (4, 5)), (1, 2), "ab")
    assert isinstance(error, GenerationInterrupted) and isinstance(error, RouteNotFound)
    assert (error.missing, error.token_ids, error.text) == ((4, 5), (1, 2), "ab")
    assert str(error) == "no eligible worker serves blocks 4-5"
    assert error.code == RouteNotFound.code
    remote = interrupted(RemoteError("no_capacity", "full"), (3,), "")
    assert isinstance(remote, RemoteError) and remote.code == "no_capacity"
    plain = interrupted(ValueError("odd"), (3,), "c")
    assert isinstance(plain, GenerationInterrupted) and plain.token_ids == (3,)
