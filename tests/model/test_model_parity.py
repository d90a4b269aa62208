"""The engine against transformers (torch, float32) on tiny random checkpoints.

Each case is written with ``save_pretrained`` and read back through
``open_model``: Llama, Llama 3 rope scaling, untied embeddings, an explicit
head_dim, Mistral with a sliding window shorter than the prompt, Qwen2 with q/k/v
biases, Qwen3 (qk-norm), Gemma 3 (local and global layers, untied with a
final softcap), Mixtral (4 experts, top 2) and Phi-3 (fused projections,
longrope). Logits must agree within 1e-4 of the largest reference logit.
"""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.model.generate import LocalModel
from meshnode.model.source import open_model
from tests.model.model_helpers import (
    CASES,
    build_reference,
    reference_greedy,
    reference_logits,
    relative_error,
    write_checkpoint,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(reference torch model, LocalModel over the saved checkpoint) for one case."""
    reference = build_reference(request.param)
    folder = write_checkpoint(reference, tmp_path_factory.mktemp(request.param))
    return request.param, reference, LocalModel.load(open_model(folder))


def _ids(count: int, seed: int, vocab: int = 96) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=count).tolist()


def test_prefill_logits_match_transformers(case):
    """When a 20-token prompt is prefilled, then every position's logits match transformers."""
    name, reference, model = case
    ids = _ids(20, seed=1)
    cache = model.runner.new_cache(64)
    hidden, _ = model.runner.forward(model.head.embed([ids]), 0, cache)
    ours = np.asarray(model.head.all_logits(hidden))[0]  # [T, V]
    assert relative_error(ours, reference_logits(reference, ids)) <= TOLERANCE, name


def test_decode_steps_through_the_cache_match_transformers(case):
    """When 16 tokens follow a 12-token prefill one at a time, then each step's logits match."""
    name, reference, model = case
    ids = _ids(28, seed=2)
    expected = reference_logits(reference, ids)  # [28, V]
    cache = model.runner.new_cache(len(ids))
    hidden, cache = model.runner.forward(model.head.embed([ids[:12]]), 0, cache)
    for position in range(12, 28):
        hidden, cache = model.runner.forward(model.head.embed([[ids[position]]]), position, cache)
        ours = np.asarray(model.head.logits(hidden))[0]  # [V]
        assert relative_error(ours, expected[position]) <= TOLERANCE, (name, position)


def test_greedy_tokens_match_transformers(case):
    """When both generate 32 tokens greedily from the same prompt, then the tokens are equal."""
    name, reference, model = case
    ids = _ids(10, seed=3)
    result = model.generate(prompt_ids=ids, max_new_tokens=32)
    assert list(result.token_ids) == reference_greedy(reference, ids, 32), name
    assert result.stop_reason == "length"


def test_longrope_past_the_original_context_matches_transformers(tmp_path):
    """When a Phi-3 prompt runs past longrope's original context (16 positions), then the
    long factors apply to the whole call, as in transformers, and logits match."""
    rope = dict(CASES["phi3"][1]["rope_parameters"], original_max_position_embeddings=16)
    reference = build_reference("phi3", rope_parameters=rope, original_max_position_embeddings=16)
    model = LocalModel.load(open_model(write_checkpoint(reference, tmp_path / "phi3-long")))
    for length in (12, 20):  # within, then past the original context
        ids = _ids(length, seed=4)
        hidden, _ = model.runner.forward(model.head.embed([ids]), 0, model.runner.new_cache(32))
        ours = np.asarray(model.head.all_logits(hidden))[0]  # [T, V]
        assert relative_error(ours, reference_logits(reference, ids)) <= TOLERANCE, length
