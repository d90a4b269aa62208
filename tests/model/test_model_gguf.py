"""GGUF weights: llama.cpp's q/k permutation, quant types, K-quant block decoding.

Tiny files are written with ``gguf.GGUFWriter`` the way llama.cpp's converter
writes a Llama: q/k rows permuted, 2-D weights quantized with
``gguf.quants.quantize``.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from meshnode.model.gguf_file import GGUFFile, read_tensor
from meshnode.model.head import ClientHead
from meshnode.model.source import open_model
from meshnode.model.span import SpanRunner
from tests.model.model_helpers import (
    build_reference,
    relative_error,
    write_checkpoint,
    write_llama_gguf,
)


@pytest.fixture(scope="module")
def tiny_llama():
    return build_reference("llama")


def _hidden_logits(source, ids):
    config = source.config
    head = ClientHead(config, source.load_client_params("float32"))
    runner = SpanRunner(config, source.load_span_params(0, config.num_layers))
    hidden, _ = runner.forward(head.embed([ids]), 0, runner.new_cache(len(ids)))
    return np.asarray(head.all_logits(hidden))[0]  # [T, V]


def test_f32_gguf_runs_like_the_safetensors_checkpoint(tiny_llama, tmp_path):
    """When a Llama is converted to an F32 GGUF (q/k permuted), then its logits equal the HF
    folder's."""
    write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf", "F32")
    folder = write_checkpoint(tiny_llama, tmp_path / "hf")
    from_gguf, from_folder = open_model(tmp_path / "tiny.gguf"), open_model(folder)
    assert from_gguf.config.num_layers == from_folder.config.num_layers
    assert from_gguf.config.tie_word_embeddings
    ids = list(range(5, 25))
    assert relative_error(_hidden_logits(from_gguf, ids), _hidden_logits(from_folder, ids)) < 1e-6


def test_llama3_rope_frequencies_come_from_the_rope_freqs_tensor(tmp_path):
    """When a Llama 3-scaled model is converted as llama.cpp does (the scaling baked into a
    rope_freqs tensor, no scaling metadata), then its logits equal the HF folder's."""
    model = build_reference("llama3_rope")
    write_llama_gguf(model, tmp_path / "tiny.gguf", "F32")
    folder = write_checkpoint(model, tmp_path / "hf")
    from_gguf, from_folder = open_model(tmp_path / "tiny.gguf"), open_model(folder)
    assert len(from_gguf.config.rope.freq_factors) == from_gguf.config.head_dim // 2
    ids = list(range(5, 45))  # past original_max_position_embeddings (16)
    assert relative_error(_hidden_logits(from_gguf, ids), _hidden_logits(from_folder, ids)) < 1e-5


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_weights_load_as_dequantized(tiny_llama, tmp_path, qtype):
    """When 2-D weights are stored as qtype, then the loader reads exactly their dequantized
    values."""
    expected = write_llama_gguf(tiny_llama, tmp_path / f"tiny-{qtype}.gguf", qtype)
    file = GGUFFile(tmp_path / f"tiny-{qtype}.gguf")
    two_d = {
        t
        for n, t in file.tensor_types().items()
        if n != "output_norm.weight" and not n.endswith("norm.weight")
    }
    assert two_d == {qtype}
    for name, values in expected.items():
        np.testing.assert_array_equal(file.read(name), values.astype(np.float32), err_msg=name)
    original = tiny_llama.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    error = np.abs(file.read("model.layers.0.mlp.up_proj.weight") - original).max()
    assert error <= {"F32": 0, "F16": 1e-3, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[qtype]


def _write_raw(path, name, qtype, blocks: np.ndarray, rows: int):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path)).tensors[0]


def test_q6_k_blocks_decode_to_known_values(tmp_path):
    """When every Q6_K quant is 0 with scale 1 and d = 0.5, then every weight is 0.5 * (0 - 32)."""
    block = np.zeros(210, dtype=np.uint8)  # ql[128] qh[64] scales[16] d(f16)
    block[192:208] = 1
    block[208:210] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    tensor = _write_raw(
        tmp_path / "q6k.gguf", "w", gguf.GGMLQuantizationType.Q6_K, np.tile(block, 4), rows=2
    )
    values = read_tensor(tensor)
    assert values.shape == (2, 512)
    np.testing.assert_array_equal(values, np.full((2, 512), -16.0, dtype=np.float32))


def test_q4_k_blocks_decode_to_known_values(tmp_path):
    """When every Q4_K quant is 2 with scale = min = 1, d = 1 and dmin = 0.5, then every weight is
    1.5."""
    block = np.zeros(144, dtype=np.uint8)  # d dmin (f16) scales[12] qs[128]
    block[0:2] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    block[2:4] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    block[4:12] = 1  # 6-bit scales and mins of sub-blocks 0-3
    block[12:16] = 0x11  # low nibbles of sub-blocks 4-7
    block[16:] = 0x22
    tensor = _write_raw(
        tmp_path / "q4k.gguf", "w", gguf.GGMLQuantizationType.Q4_K, np.tile(block, 2), rows=1
    )
    np.testing.assert_array_equal(read_tensor(tensor), np.full((1, 512), 1.5, dtype=np.float32))


def test_mixtral_gguf_keeps_experts_quantized_and_matches(tmp_path):
    """When a tiny Mixtral is written as llama.cpp does (architecture llama, experts stacked
    in ffn_*_exps, Q8_0), then the config says mixtral, a span's experts load as
    QuantizedMatrix, and its logits match transformers over the same (round-tripped)
    weights."""
    import torch

    from meshnode.model.generate import LocalModel
    from meshnode.model.quant import QuantizedMatrix
    from tests.model.model_helpers import reference_logits

    reference = build_reference("mixtral")
    path = tmp_path / "tiny-mixtral-Q8_0.gguf"
    expected = write_llama_gguf(reference, path, "Q8_0")
    source = open_model(path)
    assert (source.config.family, source.config.num_experts) == ("mixtral", 4)
    assert source.config.experts_per_token == 2
    layer = source.load_span_params(1, 2, quantized=True).layers[0]
    assert isinstance(layer["expert.3.w_gate_up"], QuantizedMatrix)
    assert isinstance(layer["expert.3.w_down"], QuantizedMatrix)
    assert isinstance(layer["router"], np.ndarray)
    with torch.no_grad():
        reference.load_state_dict(
            {name: torch.from_numpy(np.asarray(v)) for name, v in expected.items()},
            strict=False,
        )
    model = LocalModel.load(source, quantized=True)
    # GGUF has no sliding window: stay within the reference's window of 8
    ids = np.random.default_rng(4).integers(0, 96, size=8).tolist()
    hidden, _ = model.runner.forward(model.head.embed([ids]), 0, model.runner.new_cache(16))
    ours = np.asarray(model.head.all_logits(hidden))[0]  # [T, V]
    assert relative_error(ours, reference_logits(reference, ids)) <= 1e-4


@pytest.mark.slow
def test_fast_header_reads_what_gguf_reader_reads():
    """When both real GGUF files are read by GGUFHeader and by gguf.GGUFReader, then every
    metadata value and every tensor (name, type, shape, bytes) are the same."""
    from meshnode.model.gguf_reader import GGUFHeader
    from meshnode.model.source import gemma3_270m_path, smollm2_path

    for path in (smollm2_path(), gemma3_270m_path()):
        ours, theirs = GGUFHeader(path), gguf.GGUFReader(str(path))
        fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert set(ours.fields) == set(fields)
        for key, field in fields.items():
            assert ours.fields[key] == field.contents(), key
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for mine, reference in zip(ours.tensors, theirs.tensors):
            assert mine.tensor_type == reference.tensor_type
            assert list(mine.shape) == reference.shape.tolist()
            assert mine.data.dtype == reference.data.dtype
            assert np.array_equal(mine.data, reference.data), mine.name
