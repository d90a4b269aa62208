"""The real default model, SmolLM2-135M-Instruct (GGUF), against transformers loading the same file.

transformers dequantizes the same GGUF (``gguf_file=``) into float32 torch
weights, so greedy tokens must be identical and logits agree within 1e-3 of
the largest reference logit (max |ours - theirs| / max |theirs| over every
position and vocabulary entry of the prompt). Both models are loaded once per
module.
"""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.model.generate import LocalModel
from meshnode.model.source import open_model, smollm2_path
from meshnode.model.span import SpanRunner
from tests.model.model_helpers import (
    gguf_reference,
    reference_greedy,
    reference_logits,
    relative_error,
)

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]


@pytest.fixture(scope="module")
def source():
    return open_model("smollm2")


@pytest.fixture(scope="module")
def local(source):
    return LocalModel.load(source)


@pytest.fixture(scope="module")
def reference():
    """(transformers model, transformers tokenizer) over the same GGUF file."""
    return gguf_reference(smollm2_path())


def test_the_file_holds_only_quant_types_the_loader_reads(source):
    """The SmolLM2 file's tensors are F32, Q4_1 and Q8_0 (the embedding)."""
    from meshnode.model.gguf_file import GGUFFile

    types = set(GGUFFile(smollm2_path()).tensor_types().values())
    assert types == {"F32", "Q4_1", "Q8_0"}


def test_chat_template_renders_as_transformers(source, reference):
    """When a conversation is rendered with the generation prompt, then it equals transformers'."""
    _, hf_tokenizer = reference
    conversations = [
        CHAT,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    ours = source.tokenizer()
    for messages in conversations:
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_tokens_match_transformers_on_text_without_digits(source, reference):
    """When text holds no digits, then our GGUF tokenizer and transformers' give the same ids.

    (With digits they differ on purpose: tokenizer.ggml.pre = 'smollm' splits
    every digit apart, as llama.cpp and SmolLM2's own tokenizer.json do, while
    transformers' GGUF converter falls back to GPT-2's split.)
    """
    _, hf_tokenizer = reference
    ours = source.tokenizer()
    for text in ["What is the capital of France?", "  Hello,\n\nworld! It's <|im_end|> ok"]:
        assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=True)
    assert ours.encode("2024") == [ours.encode(d)[0] for d in "2024"]
    assert ours.decode(ours.encode("Grüße, 世界")) == "Grüße, 世界"


def test_prefill_logits_match_transformers(source, local, reference):
    """When the chat prompt is prefilled, then logits agree within 1e-3 of the max logit."""
    model, _ = reference
    ids = source.tokenizer().encode_chat(CHAT)
    cache = local.runner.new_cache(len(ids))
    hidden, _ = local.runner.forward(local.head.embed([ids]), 0, cache)
    ours = np.asarray(local.head.all_logits(hidden))[0]  # [T, V]
    assert relative_error(ours, reference_logits(model, ids)) <= 1e-3


def test_greedy_chat_answer_matches_transformers(source, local, reference):
    """When both answer a chat prompt greedily for 32 tokens, then the tokens are identical."""
    model, _ = reference
    result = local.generate(CHAT[0]["content"], chat=True, max_new_tokens=32)
    expected = reference_greedy(model, list(result.prompt_ids), 32)
    assert len(result.token_ids) == 32
    assert list(result.token_ids) == expected
    assert result.text.strip()


def test_capital_of_france(local):
    """When asked for the capital of France, then the model says Paris and stops at EOS."""
    result = local.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    assert result.text == "The capital of France is Paris."
    assert result.stop_reason == "eos"


def test_three_spans_equal_one_span(source, local):
    """When blocks 0-9, 10-19 and 20-29 run one after another, then they equal blocks 0-29."""
    ids = source.tokenizer().encode_chat(CHAT)
    embedded = np.asarray(local.head.embed([ids]))  # [1, T, H]
    whole, _ = local.runner.forward(embedded, 0, local.runner.new_cache(len(ids) + 1))
    hidden = embedded
    for start in (0, 10, 20):
        runner = local.runner.sub_runner(start, start + 10)  # shares the loaded weights
        hidden, _ = runner.forward(np.asarray(hidden), 0, runner.new_cache(len(ids) + 1))
    assert relative_error(np.asarray(hidden), np.asarray(whole)) <= 1e-5


def test_scan_layout_equals_unrolled_layout(source, local):
    """When a span runs with lax.scan over stacked weights, then it equals the unrolled run."""
    params = source.load_span_params(20, 30)
    embedded = np.random.default_rng(0).normal(size=(1, 24, source.config.hidden_size))
    outputs = []
    for scan in (False, True):
        runner = SpanRunner(source.config, params, scan=scan)
        cache = runner.new_cache(32)
        prefill, cache = runner.forward(embedded[:, :20].astype(np.float32), 0, cache)
        step, cache = runner.forward(embedded[:, 20:21].astype(np.float32), 20, cache)
        outputs.append((np.asarray(prefill), np.asarray(step)))
    for ours, theirs in zip(outputs[0], outputs[1]):
        assert relative_error(ours, theirs) <= 1e-5
