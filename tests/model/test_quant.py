"""Quantized weights: exact GGUF blocks, the native kernels, and the loader's choice of form.

A QuantizedMatrix must stand for exactly the values gguf's dequantizer gives;
``linear`` over one must equal a float32 matmul by the dequantized matrix,
through the fused kernel (short inputs), the dequantize-then-matmul path (long
inputs) and the in-graph fallback alike.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshnode import native
from meshnode.model import quant, weights
from meshnode.model.gguf_file import GGUFFile
from meshnode.model.quant import QuantizedMatrix, from_gguf, linear, take_rows
from meshnode.model.source import open_model
from tests.model.model_helpers import build_reference, write_llama_gguf

QTYPES = [
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
]

needs_native = pytest.mark.skipif(
    not native.load(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)


def _quantized(qtype, rows: int, width: int, seed: int = 0) -> tuple[QuantizedMatrix, np.ndarray]:
    """A random [rows, width] matrix quantized by gguf, and gguf's own dequantization."""
    values = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    matrix = from_gguf(qtype, raw, rows)
    assert matrix is not None
    return matrix, gguf.quants.dequantize(raw, qtype).reshape(rows, width).astype(np.float32)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gguf_blocks_keep_their_exact_values(qtype):
    """When a GGUF tensor is kept in its blocks, then dequantizing them gives gguf's values."""
    matrix, expected = _quantized(qtype, rows=7, width=96)
    assert matrix.shape == (7, 96)
    assert matrix.bits == (8 if qtype == gguf.GGMLQuantizationType.Q8_0 else 4)
    np.testing.assert_allclose(matrix.dequantize(), expected, rtol=1e-6, atol=1e-7)


#: block bytes and the byte offsets of float16 fields, per GGUF type with a block form
RAW_LAYOUTS = {
    "Q8_0": (34, (0,)),
    "Q4_0": (18, (0,)),
    "Q4_1": (20, (0, 2)),
    "Q5_0": (22, (0,)),
    "Q5_1": (24, (0, 2)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}


def _random_blocks(name: str, rows: int, width: int, seed: int = 7):
    """Random raw blocks of a GGUF type (valid float16 scales), its QuantizedMatrix, and
    gguf's own dequantization of them."""
    qtype = gguf.GGMLQuantizationType[name]
    block_bytes, halves = RAW_LAYOUTS[name]
    per_block = 256 if name.endswith("_K") else 32
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, width // per_block, block_bytes), dtype=np.uint8)
    for at in halves:
        values = rng.uniform(-0.05, 0.05, (rows, width // per_block)).astype(np.float16)
        raw[..., at : at + 2] = values[..., None].view(np.uint8)
    raw = raw.reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, width).astype(np.float32)
    return from_gguf(qtype, raw, rows), expected


@pytest.mark.parametrize("name", sorted(RAW_LAYOUTS))
def test_every_block_form_reads_raw_blocks_as_gguf_does(name):
    """When a tensor's blocks hold random bits (valid float16 scales), then the block form
    dequantizes to exactly what gguf's reference dequantizer gives, for every mapped type."""
    matrix, expected = _random_blocks(name, rows=3, width=512)
    assert matrix is not None and matrix.shape == (3, 512)
    assert matrix.group == (16 if name == "Q6_K" else 32)
    np.testing.assert_allclose(matrix.dequantize(), expected, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("name", sorted(RAW_LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 9, 70])
def test_native_linear_equals_a_float_matmul_for_every_block_form(name, tokens):
    """When x meets any mapped GGUF type (K-quants, 16-input groups), then linear equals
    x @ W.T through the fused kernel (1 and 9 rows) and dequantize-then-matmul (70 rows)."""
    matrix, dense = _random_blocks(name, rows=21, width=512, seed=tokens)
    x = np.random.default_rng(2).standard_normal((1, tokens, 512)).astype(np.float32)
    expected = x @ dense.T
    got = np.asarray(jax.jit(linear)(x, matrix))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_fused_parts_of_different_forms_keep_their_exact_values():
    """When a 4-bit, 32-input-group part is fused with an 8-bit, 16-input-group one (Q4_K q
    beside Q6_K v), then the fused matrix is 8-bit with 16-input groups and its values are
    exactly the parts' values, stacked."""
    q, q_dense = _random_blocks("Q4_K", rows=4, width=256, seed=1)
    v, v_dense = _random_blocks("Q6_K", rows=2, width=256, seed=2)
    fused = quant.concat_rows([q, v])
    assert (fused.bits, fused.group, fused.shape) == (8, 16, (6, 256))
    np.testing.assert_array_equal(
        fused.dequantize(), np.concatenate([q.dequantize(), v.dequantize()])
    )
    np.testing.assert_allclose(
        fused.dequantize(), np.concatenate([q_dense, v_dense]), rtol=1e-6, atol=1e-6
    )


def test_types_without_a_block_form_are_left_to_the_dequantizer():
    """When a tensor is Q3_K (or float), then from_gguf declines it."""
    values = np.zeros((2, 256), dtype=np.float32)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.F16)
    assert from_gguf(gguf.GGMLQuantizationType.F16, raw, 2) is None
    assert from_gguf(gguf.GGMLQuantizationType.Q3_K, np.zeros((2, 110), np.uint8), 2) is None


@needs_native
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("tokens", [1, 3, 17, 40])
def test_native_linear_equals_a_float_matmul(qtype, tokens):
    """When x [B, T, in] meets a quantized weight, then linear equals x @ W.T in float32,
    through the fused kernel (B * T <= FUSED_MAX_ROWS) and dequantize-then-matmul (longer)."""
    matrix, dense = _quantized(qtype, rows=37, width=160, seed=tokens)
    x = np.random.default_rng(1).standard_normal((2, tokens, 160)).astype(np.float32)
    got = np.asarray(jax.jit(linear)(x, matrix))
    expected = x @ dense.T
    assert got.shape == (2, tokens, 37)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_in_graph_dequantization_equals_numpy(qtype):
    """When the native kernels are not used, then the graph's dequantization equals numpy's."""
    matrix, dense = _quantized(qtype, rows=5, width=64)
    np.testing.assert_allclose(np.asarray(quant.dequantize(matrix)), dense, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_embedding_rows_come_out_dequantized(qtype):
    """When token ids index a quantized embedding, then each row is the dequantized row."""
    matrix, dense = _quantized(qtype, rows=11, width=64)
    ids = np.array([[3, 0, 10, 3]], dtype=np.int32)
    np.testing.assert_allclose(np.asarray(take_rows(matrix, ids)), dense[ids], rtol=1e-6, atol=1e-7)


@needs_native
def test_kernel_rejects_blocks_that_do_not_match():
    """When scale has the wrong number of blocks, then the kernel fails with a clear error."""
    matrix, _ = _quantized(gguf.GGMLQuantizationType.Q4_1, rows=4, width=64)
    broken = QuantizedMatrix(matrix.codes, matrix.scale[:, :1], matrix.offset[:, :1], 4)
    x = np.ones((1, 1, 64), np.float32)
    with pytest.raises(Exception, match="scale and offset do not match"):
        np.asarray(jax.jit(linear)(x, broken))
    sixteen = np.repeat(matrix.scale, 2, axis=1)  # 4-bit codes take 32-input groups only
    broken = QuantizedMatrix(matrix.codes, sixteen, sixteen, 4)
    with pytest.raises(Exception, match="scale and offset do not match"):
        np.asarray(jax.jit(linear)(x, broken))


# --- the loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    return build_reference("llama")


@needs_native
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_and_float_loads_compute_the_same(tiny_llama, tmp_path, qtype):
    """When a GGUF's blocks are kept quantized, then the span's output equals the float load's."""
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_llama_gguf(tiny_llama, path, qtype)
    source = open_model(path)
    kept = source.load_span_params(0, source.config.num_layers, quantized=True)
    floats = source.load_span_params(0, source.config.num_layers, quantized=False)
    for layer in kept.layers:
        assert all(
            isinstance(layer[n], QuantizedMatrix) for n in ("wqkv", "wo", "w_gate_up", "w_down")
        )
    assert kept.nbytes < floats.nbytes / 2
    assert not isinstance(source.load_client_params(quantized=False).embed, QuantizedMatrix)
    assert isinstance(source.load_client_params(quantized=True).embed, QuantizedMatrix)

    from meshnode.model.span import SpanRunner

    hidden = np.random.default_rng(0).standard_normal((1, 20, source.config.hidden_size))
    outputs = []
    for params in (kept, floats):
        runner = SpanRunner(source.config, params)
        cache = runner.new_cache(24)
        prefill, cache = runner.forward(hidden[:, :19].astype(np.float32), 0, cache)
        step, _ = runner.forward(hidden[:, 19:].astype(np.float32), 19, cache)
        outputs.append(np.concatenate([np.asarray(prefill), np.asarray(step)], axis=1))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


class _MixedReader:
    """A GGUF file whose layer 1 down projection has no block form (as Q6_K layers of a
    Q4_K_M file), and whose layer 0 gate projection is 8-bit while its up projection is 4-bit."""

    def __init__(self, file: GGUFFile) -> None:
        self._file = file

    def has(self, name: str) -> bool:
        return self._file.has(name)

    def read(self, name: str) -> np.ndarray:
        if name == "model.layers.0.mlp.gate_proj.weight":  # what its Q8_0 blocks hold
            return self.read_quantized(name).dequantize()
        return self._file.read(name)

    def read_quantized(self, name: str) -> QuantizedMatrix | None:
        if name == "model.layers.1.mlp.down_proj.weight":
            return None
        if name == "model.layers.0.mlp.gate_proj.weight":
            dense = self._file.read(name)
            raw = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q8_0)
            return from_gguf(gguf.GGMLQuantizationType.Q8_0, raw, dense.shape[0])
        return self._file.read_quantized(name)


def test_blocks_may_differ_in_form(tiny_llama, tmp_path):
    """When one layer's weight has no block form, then that layer's weight is float32
    [in, out]; when a fused weight's parts differ in bits, it takes 8-bit codes; the others
    stay as they are, and the span computes what the all-float load does, unrolled and
    stacked for scan alike."""
    path = tmp_path / "tiny-Q4_1.gguf"
    write_llama_gguf(tiny_llama, path, "Q4_1")
    file = GGUFFile(path)
    c = file.config
    params = weights.span_params(c, _MixedReader(file), 0, c.num_layers, "float32", quantized=True)
    assert isinstance(params.layers[0]["wqkv"], QuantizedMatrix)
    assert isinstance(params.layers[0]["w_down"], QuantizedMatrix)
    assert isinstance(params.layers[1]["w_down"], np.ndarray)
    assert params.layers[1]["w_down"].shape == (c.intermediate_size, c.hidden_size)
    np.testing.assert_allclose(
        params.layers[1]["w_down"], file.read("model.layers.1.mlp.down_proj.weight").T, rtol=1e-6
    )
    assert params.layers[0]["w_gate_up"].bits == 8  # its parts differ in bits
    assert params.layers[1]["w_gate_up"].bits == 4
    stacked = params.stacked()
    assert stacked["w_down"].shape == (c.num_layers, c.intermediate_size, c.hidden_size)
    assert stacked["w_gate_up"].shape == (c.num_layers, c.hidden_size, 2 * c.intermediate_size)
    assert isinstance(stacked["wqkv"], QuantizedMatrix)

    from meshnode.model.span import SpanRunner

    floats = weights.span_params(c, _MixedReader(file), 0, c.num_layers, "float32")
    hidden = np.random.default_rng(3).standard_normal((1, 5, c.hidden_size)).astype(np.float32)
    reference, _ = SpanRunner(c, floats).forward(hidden, 0, SpanRunner(c, floats).new_cache(8))
    for scan in (False, True):
        runner = SpanRunner(c, params, scan=scan)
        out, _ = runner.forward(hidden, 0, runner.new_cache(8))
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-4, atol=1e-4)


def _native_state(tmp_path, **env: str) -> list[str]:
    code = (
        "from meshnode import native; from meshnode.model.source import keep_quantized;"
        "print(native.load(), keep_quantized(None, 'float32'), '|', native.unavailable_reason())"
    )
    environ = dict(os.environ, JAX_PLATFORMS="cpu", MESHNODE_NATIVE_CACHE=str(tmp_path), **env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    ).stdout
    flags, _, reason = out.partition("|")
    return [*flags.split(), reason.strip()]


@pytest.mark.slow
def test_native_kernels_can_be_switched_off(tmp_path):
    """When MESHNODE_NATIVE=0, then the kernels are not loaded and weights load as float."""
    assert _native_state(tmp_path, MESHNODE_NATIVE="0") == ["False", "False", "MESHNODE_NATIVE=0"]


@pytest.mark.slow
def test_without_a_compiler_weights_load_as_float(tmp_path):
    """When no C++ compiler is found (and nothing is cached), then the reason says so and
    weights load as float."""
    loaded, kept, reason = _native_state(tmp_path / "empty", CXX="no-such-compiler-here")
    assert (loaded, kept) == ("False", "False")
    assert "no C++ compiler (no-such-compiler-here)" in reason


@pytest.mark.slow
@needs_native
def test_an_unwritable_cache_folder_falls_back_to_the_temp_folder(tmp_path):
    """When the cache folder cannot be created, then the kernels are built in the temp folder."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _native_state(blocker / "sub")[:2] == ["True", "True"]


@needs_native
def test_default_load_keeps_blocks_only_for_float32():
    """When the dtype is float32 and the kernels run, then the default keeps blocks; bfloat16 does
    not."""
    from meshnode.model.source import keep_quantized

    assert keep_quantized(None, "float32") is True
    assert keep_quantized(None, jnp.bfloat16) is False
    assert keep_quantized(False, "float32") is False


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantized_embedding_and_head_equal_their_float_forms(tied):
    """When the embedding (and an untied head) are quantized, then embed and logits equal
    those of the same values in float (the head through the fused kernel or in-graph)."""
    from meshnode.model.config import ModelConfig
    from meshnode.model.head import ClientHead, ClientParams

    vocab, hidden = 96, 64
    embed, embed_dense = _quantized(gguf.GGMLQuantizationType.Q8_0, vocab, hidden, seed=1)
    head, head_dense = _quantized(gguf.GGMLQuantizationType.Q4_1, vocab, hidden, seed=2)
    norm = np.linspace(0.5, 1.5, hidden).astype(np.float32)
    config = ModelConfig(
        family="llama",
        hidden_size=hidden,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    quantized = ClientHead(config, ClientParams(embed, norm, None if tied else head))
    dense = ClientHead(
        config,
        ClientParams(embed_dense, norm, None if tied else np.ascontiguousarray(head_dense.T)),
    )
    ids = np.array([[1, 50, 95]], dtype=np.int32)
    np.testing.assert_allclose(
        np.asarray(quantized.embed(ids)), np.asarray(dense.embed(ids)), rtol=1e-6, atol=1e-7
    )
    hidden_states = np.random.default_rng(4).standard_normal((1, 3, hidden)).astype(np.float32)
    for method in ("logits", "all_logits"):  # 1 row, 3 rows: the fused kernel
        got = np.asarray(getattr(quantized, method)(hidden_states))
        expected = np.asarray(getattr(dense, method)(hidden_states))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
