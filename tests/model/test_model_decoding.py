"""The generation loop's timings, on a fake head and fake blocks with a scripted clock."""

from __future__ import annotations

import numpy as np

from meshnode.model.decoding import generate_tokens
from meshnode.model.sampling import Sampler


class _Head:
    """Embeds token t as [t]; logits favour (the hidden value + 1) mod 10."""

    def embed(self, ids):
        return np.asarray(ids, dtype=np.float32)[..., None]  # [1, T, 1]

    def logits(self, hidden):
        last = int(np.asarray(hidden)[0, -1, 0])
        return np.eye(10, dtype=np.float32)[[(last + 1) % 10]]  # [1, V]


class _Clock:
    """Advances by each forward call's scripted duration."""

    def __init__(self, durations):
        self.now = 0.0
        self._durations = list(durations)

    def __call__(self):
        return self.now

    def forward(self, hidden, start_position):
        self.now += self._durations.pop(0)
        return hidden


def test_decode_rate_leaves_out_the_first_step_which_compiles():
    """When the first decode step takes 5 s (compiling) and the next four 0.1 s each, then
    prefill_s is the prompt's time and decode_tok_s is 10 tokens/s, not 5/5.4."""
    clock = _Clock([0.5, 5.0, 0.1, 0.1, 0.1, 0.1])
    result = generate_tokens(
        _Head(), clock.forward, [3], max_new_tokens=6, sampler=Sampler(), clock=clock
    )
    assert result.token_ids == (4, 5, 6, 7, 8, 9)
    assert result.prefill_s == 0.5
    assert abs(result.decode_tok_s - 10.0) < 1e-9


def test_a_single_decode_step_is_its_own_rate():
    """When only one decode step runs, then its rate is reported, compilation included."""
    clock = _Clock([0.5, 2.0])
    result = generate_tokens(
        _Head(), clock.forward, [3], max_new_tokens=2, sampler=Sampler(), clock=clock
    )
    assert result.token_ids == (4, 5)
    assert abs(result.decode_tok_s - 0.5) < 1e-9
