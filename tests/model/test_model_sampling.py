"""Sampling: greedy, temperature, top-k, top-p, and reproducibility from a seed."""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.errors import ModelError
from meshnode.model.sampling import Sampler, SamplingOptions, filtered_probabilities

LOGITS = np.log(np.array([0.05, 0.5, 0.15, 0.3], dtype=np.float32))


def test_temperature_zero_is_argmax():
    """When temperature is 0, then the highest logit wins whatever the seed."""
    assert Sampler(SamplingOptions(temperature=0.0, seed=1))(LOGITS) == 1


def test_same_seed_same_tokens_and_other_seed_other_tokens():
    """When two samplers share a seed, then they draw the same stream; another seed draws
    another."""
    logits = np.random.default_rng(0).normal(size=500).astype(np.float32)
    options = SamplingOptions(temperature=1.0, seed=7)
    a, b = Sampler(options), Sampler(options)
    c = Sampler(SamplingOptions(temperature=1.0, seed=8))
    stream_a = [a(logits) for _ in range(50)]
    assert stream_a == [b(logits) for _ in range(50)]
    assert stream_a != [c(logits) for _ in range(50)]


def test_top_k_keeps_the_k_best():
    """When top_k = 2, then only the two most likely tokens keep probability, renormalised."""
    probs = filtered_probabilities(LOGITS, SamplingOptions(temperature=1.0, top_k=2))
    np.testing.assert_allclose(probs, [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    """When top_p = 0.7, then tokens 1 (0.5) and 3 (0.3) are kept: 0.5 alone falls short."""
    probs = filtered_probabilities(LOGITS, SamplingOptions(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(probs, [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
    single = filtered_probabilities(LOGITS, SamplingOptions(temperature=1.0, top_p=0.4))
    np.testing.assert_allclose(single, [0, 1, 0, 0])


def test_draws_follow_the_filtered_distribution():
    """When sampling many times at temperature 1, then frequencies follow the probabilities."""
    sampler = Sampler(SamplingOptions(temperature=1.0, seed=3))
    counts = np.bincount([sampler(LOGITS) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.05, 0.5, 0.15, 0.3], atol=0.03)


def test_low_temperature_sharpens():
    """When temperature drops, then the best token's probability rises."""
    warm = filtered_probabilities(LOGITS, SamplingOptions(temperature=1.0))
    cold = filtered_probabilities(LOGITS, SamplingOptions(temperature=0.2))
    assert cold[1] > warm[1]


@pytest.mark.parametrize(
    "options", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_invalid_options_are_refused(options):
    """When an option is out of range, then SamplingOptions raises ModelError."""
    with pytest.raises(ModelError):
        SamplingOptions(**options)
