"""Model sources: config parsing, fingerprints, buckets, and the generate command on a
tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from meshnode.cli import main
from meshnode.model.config import config_from_hf_dict
from meshnode.model.generate import LocalModel
from meshnode.model.source import open_model
from meshnode.model.span import bucket_length, cache_length
from tests.model.model_helpers import build_reference, write_checkpoint

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(build_reference("llama", seed=0), tmp_path_factory.mktemp("tiny"))


def test_rope_theta_is_read_from_either_place():
    """When rope_theta is top-level (old) or in rope_parameters (transformers 5), then both are
    read."""
    old = config_from_hf_dict({**LLAMA, "rope_theta": 5e5})
    new = config_from_hf_dict(
        {**LLAMA, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    )
    assert old.rope.theta == new.rope.theta == 5e5
    scaled = config_from_hf_dict(
        {**LLAMA, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    )
    assert (scaled.rope.rope_type, scaled.rope.factor) == ("llama3", 8.0)


def test_head_dim_and_windows_come_from_the_config():
    """When head_dim and sliding_window are given, then the config carries them per layer."""
    config = config_from_hf_dict(
        {**LLAMA, "model_type": "mistral", "head_dim": 32, "sliding_window": 8}
    )
    assert (config.head_dim, config.q_size, config.layer_windows) == (32, 128, (8, 8))


def test_fingerprint_is_stable_and_tracks_weights(checkpoint, tmp_path):
    """When the same files are opened twice or copied elsewhere, then the fingerprint is the same;
    when weights differ, then it differs."""
    first = open_model(checkpoint).fingerprint
    assert open_model(checkpoint).fingerprint == first
    copy = shutil.copytree(checkpoint, tmp_path / "elsewhere" / checkpoint.name)
    assert open_model(copy).fingerprint == first
    other = write_checkpoint(build_reference("llama", seed=1), tmp_path / "other")
    assert open_model(other).fingerprint != first


def test_buckets():
    """Prefill lengths round up to buckets; caches to a power of two, then multiples of 256."""
    assert [bucket_length(n) for n in (1, 2, 16, 17, 100, 2048, 2049)] == [
        1,
        16,
        16,
        32,
        128,
        2048,
        4096,
    ]
    assert [cache_length(n) for n in (1, 37, 256, 257, 1000)] == [16, 64, 256, 512, 1024]


def test_padded_prefill_equals_token_by_token(checkpoint):
    """When a 5-token prompt is prefilled (padded to its 16-token bucket), then its hidden states
    equal feeding the same tokens one position at a time (no padding)."""
    model = LocalModel.load(open_model(checkpoint))
    embedded = np.asarray(model.head.embed([[3, 1, 4, 1, 5]]))  # [1, 5, H]
    padded, _ = model.runner.forward(embedded, 0, model.runner.new_cache(64))
    assert padded.shape == (1, 5, 64)
    cache, steps = model.runner.new_cache(64), []
    for position in range(5):
        out, cache = model.runner.forward(embedded[:, position : position + 1], position, cache)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), np.asarray(padded), rtol=1e-5, atol=1e-5
    )


def test_batch_of_two_equals_two_single_runs(checkpoint):
    """When two sequences run as one batch, then each row equals its own single run."""
    model = LocalModel.load(open_model(checkpoint))
    ids = [[1, 2, 3, 4], [9, 8, 7, 6]]
    both, _ = model.runner.forward(model.head.embed(ids), 0, model.runner.new_cache(8, batch=2))
    for row, single_ids in enumerate(ids):
        single, _ = model.runner.forward(
            model.head.embed([single_ids]), 0, model.runner.new_cache(8)
        )
        np.testing.assert_allclose(
            np.asarray(both)[row], np.asarray(single)[0], rtol=1e-5, atol=1e-5
        )


def test_generate_command_json_matches_the_python_api(checkpoint, capsys):
    """When `meshnode generate --local --json` runs, then it prints the Python API's result."""
    assert (
        main(
            [
                "generate",
                "--local",
                "--model",
                str(checkpoint),
                "--prompt-ids",
                "5,6,7",
                "--max-new-tokens",
                "6",
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = LocalModel.load(open_model(checkpoint)).generate(
        prompt_ids=[5, 6, 7], max_new_tokens=6
    )
    assert printed["token_ids"] == list(expected.token_ids)
    assert len(printed["token_ids"]) == 6
    assert set(printed) >= {"token_ids", "text", "prefill_s", "decode_tok_s"}


def test_seeded_sampling_is_reproducible_through_the_command(checkpoint, capsys):
    """When the command samples with a seed twice, then both runs print the same tokens."""
    argv = [
        "generate",
        "--local",
        "--model",
        str(checkpoint),
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "11",
        "--json",
    ]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"])
    assert runs[0] == runs[1]
