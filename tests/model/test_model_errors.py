"""Bad input gives named errors with clear messages, and the CLI turns them into exit code 2."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from meshnode.cli import main
from meshnode.errors import (
    CacheOverflow,
    ConfigError,
    MissingWeights,
    ShapeMismatch,
    UnknownArchitecture,
)
from meshnode.model.source import open_model
from meshnode.model.span import SpanRunner
from tests.model.model_helpers import build_reference, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(build_reference("llama"), tmp_path_factory.mktemp("good"))


def _copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "copy")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_config_is_a_config_error(checkpoint, tmp_path):
    """When a folder has no config.json, then opening it raises ConfigError naming the file."""
    folder = _copy(checkpoint, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        open_model(folder)


def test_unknown_architecture(checkpoint, tmp_path):
    """When config.json names a family the engine lacks, then UnknownArchitecture lists the known
    ones."""
    folder = _copy(checkpoint, tmp_path)
    _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnknownArchitecture, match="llama, mistral, qwen2"):
        open_model(folder)


def test_unknown_gguf_architecture(tmp_path):
    """When a GGUF file's architecture is unsupported, then UnknownArchitecture names it."""
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnknownArchitecture, match="'gpt2'"):
        open_model(tmp_path / "x.gguf")


def test_missing_block_tensor_fails_only_the_spans_that_need_it(checkpoint, tmp_path):
    """When block 2 lacks its q_proj, then span [0, 1) still loads and [0, 3) raises
    MissingWeights."""
    folder = _copy(checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    source = open_model(folder)
    assert source.load_span_params(0, 1).num_layers == 1
    with pytest.raises(MissingWeights, match=r"model\.layers\.2\.self_attn\.q_proj\.weight"):
        source.load_span_params(0, 3)


def test_shape_mismatch_names_the_tensor(checkpoint, tmp_path):
    """When config.json disagrees with a tensor's shape, then ShapeMismatch names tensor and
    shapes."""
    folder = _copy(checkpoint, tmp_path)
    _edit_config(folder, intermediate_size=80)
    with pytest.raises(
        ShapeMismatch, match=r"gate_proj.weight' has shape \(96, 64\), expected \(80, 64\)"
    ):
        open_model(folder).load_span_params(0, 1)


def test_runner_rejects_bad_hidden_states_and_overflow(checkpoint):
    """When hidden states have the wrong width or overrun the cache, then named errors
    are raised."""
    source = open_model(checkpoint)
    runner = SpanRunner(source.config, source.load_span_params(0, 3))
    cache = runner.new_cache(16)
    with pytest.raises(ShapeMismatch, match="hidden size 32"):
        runner.forward(np.zeros((1, 2, 32), np.float32), 0, cache)
    with pytest.raises(CacheOverflow, match=r"\[10, 20\)"):
        runner.forward(np.zeros((1, 10, 64), np.float32), 10, cache)


def test_cli_prints_model_errors_and_exits_2(checkpoint, tmp_path, capsys):
    """When generate is given a folder without config.json, then it prints the error and
    returns 2."""
    folder = _copy(checkpoint, tmp_path)
    (folder / "config.json").unlink()
    code = main(["generate", "--local", "--model", str(folder), "--prompt-ids", "1,2"])
    assert code == 2
    assert "config.json" in capsys.readouterr().err


def test_unknown_model_spec(capsys):
    """When --model is neither a folder, a .gguf nor smollm2, then the CLI says so and returns 2."""
    assert main(["generate", "--local", "--model", "no-such-model", "--prompt", "hi"]) == 2
    assert "no-such-model" in capsys.readouterr().err
