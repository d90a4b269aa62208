"""The step-driven ``Generation`` as a specification: no reactor, no JAX, a scripted clock.

The fake model: "logits" are one-hot vectors chosen by the test, so each test
says which token the blocks' output stands for.
"""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.errors import ModelError
from meshnode.model.decoding import STOP_EOS, STOP_LENGTH, BlocksInput, Generation
from meshnode.model.sampling import Sampler, SamplingOptions

VOCAB = 10


def one_hot(token: int) -> np.ndarray:
    return np.eye(VOCAB, dtype=np.float32)[token]  # [V]


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def generation(prompt=(3, 1, 4), max_new_tokens=8, stop_ids=frozenset(), clock=None, **kw):
    return Generation(
        list(prompt), max_new_tokens=max_new_tokens, sampler=Sampler(SamplingOptions(**kw)),
        stop_ids=frozenset(stop_ids), clock=clock or Clock(),
    )


def test_prefill_gives_the_whole_prompt_at_position_zero():
    """When a generation starts, then the blocks' first input is the whole prompt at 0."""
    gen = generation(prompt=(3, 1, 4))
    step = gen.next_input()
    assert step == BlocksInput((3, 1, 4), 0)
    assert step.prefill
    assert step.ids().tolist() == [[3, 1, 4]] and step.ids().dtype == np.int32


def test_decode_gives_each_new_token_at_the_next_position():
    """When the prefill's logits choose 7, then the next input is 7 at position len(prompt),
    and the one after is the token chosen then, one position further."""
    gen = generation(prompt=(3, 1, 4))
    gen.next_input()
    assert gen.take_logits(one_hot(7)).token == 7
    assert gen.next_input() == BlocksInput((7,), 3)
    gen.take_logits(one_hot(2))
    step = gen.next_input()
    assert step == BlocksInput((2,), 4) and not step.prefill
    assert gen.token_ids == (7, 2)


def test_stops_on_an_eos_id_and_keeps_it():
    """When a stop id is sampled, then the generation is done with reason "eos", the id is
    the last token, and no further input is handed out."""
    gen = generation(stop_ids={0})
    gen.next_input()
    assert gen.take_logits(one_hot(5)).stop_reason is None
    gen.next_input()
    last = gen.take_logits(one_hot(0))
    assert (last.token, last.stop_reason) == (0, STOP_EOS)
    assert gen.done
    assert gen.result().token_ids == (5, 0) and gen.result().stop_reason == STOP_EOS
    with pytest.raises(ModelError):
        gen.next_input()


def test_stops_on_length_after_max_new_tokens():
    """When max_new_tokens tokens are chosen, then it stops with reason "length"; the prefill
    counts as the first of them (max_new_tokens=3: a prefill and two decode steps)."""
    gen = generation(max_new_tokens=3)
    inputs = []
    while not gen.done:
        inputs.append(gen.next_input())
        gen.take_logits(one_hot(len(inputs)))
    assert [step.start for step in inputs] == [0, 3, 4]
    assert gen.result().token_ids == (1, 2, 3)
    assert gen.result().stop_reason == STOP_LENGTH


def test_a_single_token_generation_is_only_a_prefill():
    """When max_new_tokens is 1, then the prefill's token ends it (length), with no decode."""
    gen = generation(max_new_tokens=1)
    gen.next_input()
    assert gen.take_logits(one_hot(4)).stop_reason == STOP_LENGTH
    assert gen.result().decode_tok_s == 0.0


def test_timings_come_from_the_injected_clock():
    """When the prefill takes 0.5 s, the first decode step 5 s (compiling) and the next three
    0.1 s each, then prefill_s is 0.5 and decode_tok_s is 3 / 0.3 = 10 tokens/s."""
    clock = Clock()
    gen = generation(max_new_tokens=5, clock=clock)
    for seconds in (0.5, 5.0, 0.1, 0.1, 0.1):
        gen.next_input()
        clock.now += seconds
        gen.take_logits(one_hot(1))
    result = gen.result()
    assert result.prefill_s == 0.5
    assert result.decode_tok_s == pytest.approx(10.0)


def test_time_outside_the_steps_is_not_counted_in_the_prefill():
    """When time passes before the first input is asked for, then prefill_s leaves it out."""
    clock = Clock()
    gen = generation(max_new_tokens=1, clock=clock)
    clock.now = 100.0
    gen.next_input()
    clock.now += 0.25
    gen.take_logits(one_hot(1))
    assert gen.result().prefill_s == 0.25


def test_sampling_is_the_samplers():
    """When the sampler is seeded, then the same logits give the same tokens, run after run."""
    logits = np.log(np.full(VOCAB, 1.0 / VOCAB, dtype=np.float32))  # [V], uniform

    def run():
        gen = generation(max_new_tokens=6, temperature=1.0, seed=7)
        while not gen.done:
            gen.next_input()
            gen.take_logits(logits)
        return gen.token_ids

    assert run() == run()
    assert len(set(run())) > 1


def test_steps_out_of_turn_are_refused():
    """When logits come with no input handed out, or a second input is asked for before the
    first one's logits, then ModelError; so is a result before the end."""
    gen = generation()
    with pytest.raises(ModelError):
        gen.take_logits(one_hot(1))
    gen.next_input()
    with pytest.raises(ModelError):
        gen.next_input()
    with pytest.raises(ModelError):
        gen.result()


@pytest.mark.parametrize(("prompt", "max_new_tokens"), [((), 4), ((1,), 0)])
def test_an_empty_prompt_or_no_new_tokens_is_refused(prompt, max_new_tokens):
    """When the prompt is empty or max_new_tokens < 1, then ModelError at construction."""
    with pytest.raises(ModelError):
        generation(prompt=prompt, max_new_tokens=max_new_tokens)
