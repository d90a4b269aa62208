"""Batch invariance of the native kernels and the client head: a row's bits never depend on
how many rows share the call.

For every row count B up to ``quant.FUSED_MAX_ROWS``, each row of ``linear`` over B rows
(4-bit, Q8_0, 8-bit with 16-input groups as Q6_K, float32 dense), of RMSNorm's statistic
(native kernels or not) and of the client head's logits is bitwise the row computed
alone, and all equal the numpy reference to float32 rounding. Without the native kernels
the same calls still compute the right values (but promise no bits).
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest

from meshnode import native
from meshnode.model import quant
from meshnode.model.layers.norms import mean_square
from meshnode.model.quant import from_gguf, linear

needs_native = pytest.mark.skipif(
    not native.load(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)

ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 63, 64]
#: 10 blocks of 32 inputs (and 11: an odd last block for the alternating accumulators)
WIDTH, OUT = 320, 67


def _matrix(form: str, out: int, width: int, seed: int = 0):
    """A weight of ``form`` as ``linear`` takes it, and its float32 values [out, in]."""
    rng = np.random.default_rng(seed)
    if form == "float32":
        dense = rng.standard_normal((out, width)).astype(np.float32)
        return np.ascontiguousarray(dense.T), dense  # [in, out]
    if form == "Q6_K":  # 8-bit codes, a scale per 16 inputs
        codes = rng.integers(-32, 32, (out, width), dtype=np.int8)
        scale = rng.uniform(0.001, 0.02, (out, width // 16)).astype(np.float32)
        matrix = quant.QuantizedMatrix(codes, scale, np.zeros_like(scale), 8)
        return matrix, matrix.dequantize()
    qtype = gguf.GGMLQuantizationType[form]
    values = rng.standard_normal((out, width)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    matrix = from_gguf(qtype, raw, out)
    return matrix, gguf.quants.dequantize(raw, qtype).reshape(out, width).astype(np.float32)


def _rows_alone(fn, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + 1])) for i in range(len(x))])


@needs_native
@pytest.mark.parametrize("form", ["Q4_1", "Q4_0", "Q8_0", "Q6_K", "float32"])
@pytest.mark.parametrize("width", [WIDTH, WIDTH + 32])
def test_each_row_is_bitwise_its_result_alone_for_every_batch_size(form, width):
    """When B rows (1..64, odd counts, rows that differ) go through linear at once, then every
    row is bitwise that row computed alone, and all equal x @ W.T to float32 rounding."""
    weight, dense = _matrix(form, OUT, width)
    x = np.random.default_rng(1).standard_normal((quant.FUSED_MAX_ROWS, width))
    x = (x * np.linspace(0.1, 10, len(x))[:, None]).astype(np.float32)  # rows of other scales
    fn = jax.jit(linear)
    alone = _rows_alone(lambda row: fn(row, weight), x)  # [64, OUT]
    for rows in ROW_COUNTS:
        np.testing.assert_array_equal(np.asarray(fn(x[:rows], weight)), alone[:rows])
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    np.testing.assert_allclose(alone, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@needs_native
def test_a_row_does_not_depend_on_its_batch_mates():
    """When the same row shares a call with different other rows, or sits at another index,
    then its result is bitwise the same."""
    weight, _ = _matrix("Q4_1", OUT, WIDTH)
    rng = np.random.default_rng(5)
    row = rng.standard_normal((1, WIDTH)).astype(np.float32)
    fn = jax.jit(linear)
    alone = np.asarray(fn(row, weight))[0]
    for mates, at in ((6, 0), (6, 6), (40, 17)):
        batch = rng.standard_normal((mates + 1, WIDTH)).astype(np.float32)
        batch[at] = row[0]
        np.testing.assert_array_equal(np.asarray(fn(batch, weight))[at], alone)


@needs_native
@pytest.mark.parametrize("form", ["Q4_1", "Q8_0", "Q6_K", "float32"])
def test_zero_rows_of_a_padded_batch_come_out_zero_and_leave_the_others_alone(form):
    """When a batch carries rows of zeros (a row bucket's padding, -0.0 too) among live rows,
    then each zero row comes out exactly +0.0, as x @ W.T gives, and each live row is
    bitwise its result alone; a batch of zeros only comes out all zeros."""
    weight, _ = _matrix(form, OUT, WIDTH)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, WIDTH)).astype(np.float32)
    dead = [1, 4, 5, 7]
    x[dead] = 0.0
    x[5] = -0.0
    fn = jax.jit(linear)
    out = np.asarray(fn(x, weight))
    alone = _rows_alone(lambda row: fn(row, weight), x)
    np.testing.assert_array_equal(out, alone)
    zeros = out[dead]
    assert not zeros.any() and not np.signbit(zeros).any()
    live = [i for i in range(8) if i not in dead]
    assert np.abs(out[live]).min(axis=1).all()  # live rows were computed
    np.testing.assert_array_equal(np.asarray(fn(np.zeros((4, WIDTH), np.float32), weight)),
                                  np.zeros((4, OUT), np.float32))


@pytest.mark.parametrize("width", [64, 576, 100])
def test_rms_norm_statistic_is_batch_invariant(width):
    """When RMSNorm's mean square runs over B rows (XLA's own row reduction changes its order
    from 8 rows on), then each row is bitwise its value alone and equals numpy's mean, with
    or without the native kernels."""
    x = np.random.default_rng(2).standard_normal((quant.FUSED_MAX_ROWS, width))
    x = x.astype(np.float32)
    fn = jax.jit(mean_square)
    alone = _rows_alone(fn, x)  # [64, 1]
    for rows in ROW_COUNTS:
        np.testing.assert_array_equal(np.asarray(fn(x[:rows])), alone[:rows])
    np.testing.assert_allclose(alone[:, 0], (x.astype(np.float64) ** 2).mean(-1), rtol=1e-6)


@needs_native
def test_longer_inputs_keep_the_prefill_path_and_its_values():
    """When an input has more rows than FUSED_MAX_ROWS (prefill), then linear still equals
    x @ W.T (through dequantize-then-XLA, or XLA's float matmul)."""
    for form in ("Q4_1", "float32"):
        weight, dense = _matrix(form, OUT, WIDTH)
        x = np.random.default_rng(3).standard_normal((1, 80, WIDTH)).astype(np.float32)
        got = np.asarray(jax.jit(linear)(x, weight))
        np.testing.assert_allclose(got, x @ dense.T, rtol=1e-4, atol=1e-3)


@needs_native
def test_client_head_logits_are_batch_invariant():
    """When the client head computes logits for B rows (norm, projection by a quantized tied
    embedding, softcap), then each row is bitwise that row's logits alone."""
    head = _small_head(True, softcap=30.0)
    assert head.batch_invariant
    hidden = np.random.default_rng(4).standard_normal((33, 2, 64)).astype(np.float32)
    alone = _rows_alone(head.logits, hidden)  # [33, V]
    for rows in (2, 8, 9, 33):
        np.testing.assert_array_equal(np.asarray(head.logits(hidden[:rows])), alone[:rows])


@needs_native
def test_a_float_head_stays_on_xla_and_says_it_is_not_batch_invariant():
    """When the head is float, then it keeps XLA's matmul (faster for one row than the dense
    kernel), makes no transposed copy, and says it is not batch-invariant, so the client
    does not batch it; its logits still equal the float64 reference."""
    head = _small_head(False)
    assert not head.batch_invariant and "lm_head" not in head._params
    hidden = np.random.default_rng(5).standard_normal((3, 1, 64)).astype(np.float32)
    _, dense = _matrix("Q8_0", 96, 64, seed=7)
    norm = np.linspace(0.5, 1.5, 64)
    x = hidden[:, -1].astype(np.float64)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * norm
    np.testing.assert_allclose(np.asarray(head.logits(hidden)), x @ dense.T.astype(np.float64),
                               rtol=1e-4, atol=1e-4)


def _small_head(quantized: bool, softcap: float | None = None):
    from meshnode.model.config import ModelConfig
    from meshnode.model.head import ClientHead, ClientParams

    vocab, hidden = 96, 64
    embed, dense = _matrix("Q8_0", vocab, hidden, seed=7)
    config = ModelConfig(
        family="llama", hidden_size=hidden, intermediate_size=128, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=16, vocab_size=vocab, tie_word_embeddings=True,
        final_softcap=softcap,
    )
    norm = np.linspace(0.5, 1.5, hidden).astype(np.float32)
    return ClientHead(config, ClientParams(embed if quantized else dense, norm, None))


@pytest.mark.slow
@needs_native
def test_smollm2_head_is_batch_invariant():
    """When SmolLM2's real head (its GGUF's quantized tied embedding) computes logits for 1 to
    64 rows, then every row is bitwise its logits alone, and the embedding rows too."""
    from meshnode.model.head import ClientHead
    from meshnode.model.source import open_model, smollm2_path

    source = open_model(smollm2_path())
    head = ClientHead(source.config, source.load_client_params())
    assert quant.is_quantized(source.load_client_params().embed)
    hidden = np.random.default_rng(0).standard_normal((64, 2, source.config.hidden_size))
    hidden = hidden.astype(np.float32)
    alone = _rows_alone(head.logits, hidden)
    for rows in (2, 7, 8, 16, 64):
        np.testing.assert_array_equal(np.asarray(head.logits(hidden[:rows])), alone[:rows])
    ids = np.arange(0, 64 * 700, 700).reshape(64, 1)
    np.testing.assert_array_equal(np.asarray(head.embed(ids)), _rows_alone(head.embed, ids))


_FALLBACK = """
import numpy as np, jax
from meshnode import native
from meshnode.model import quant
from tests.model.test_batch_invariance import _matrix, _small_head
assert not native.load() and not quant.batch_invariant()
for form in ("Q4_1", "Q8_0", "float32"):
    weight, dense = _matrix(form, 67, 320)
    x = np.random.default_rng(1).standard_normal((9, 320)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(quant.linear)(x, weight)), x @ dense.T,
                               rtol=1e-4, atol=1e-3)
head = _small_head(True)
assert not head.batch_invariant and "lm_head" not in head._params
print("fallback ok")
"""


@pytest.mark.slow
def test_without_native_kernels_values_hold_and_invariance_is_not_claimed(tmp_path):
    """When MESHNODE_NATIVE=0, then linear and the head compute the same values through
    XLA, and neither quant nor the head claims batch invariance (so the client does not
    batch its head calls)."""
    env = dict(os.environ, MESHNODE_NATIVE="0", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fallback ok" in out.stdout


_OTHER_PATH = """
import numpy as np, jax
from meshnode import native
from meshnode.model import quant
from tests.model.test_batch_invariance import _matrix
assert native.load(), native.unavailable_reason()
fn = jax.jit(quant.linear)
for form in ("Q4_1", "Q8_0", "Q6_K", "float32"):
    weight, dense = _matrix(form, 67, 352)
    x = np.random.default_rng(1).standard_normal((64, 352)).astype(np.float32)
    alone = np.concatenate([np.asarray(fn(x[i:i + 1], weight)) for i in range(64)])
    for rows in (2, 5, 8, 33, 64):
        np.testing.assert_array_equal(np.asarray(fn(x[:rows], weight)), alone[:rows])
    np.testing.assert_allclose(alone, x @ dense.T, rtol=1e-4, atol=1e-3)
print("path ok")
"""


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "portable"])
def test_the_avx2_and_portable_paths_are_batch_invariant_too(native_cache_for, march):
    """When the kernels are built for AVX2 + FMA only, or for baseline x86-64 (the portable
    C++), then those paths are batch-invariant and right as well."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 instruction levels")
    env = dict(
        os.environ, MESHNODE_NATIVE_MARCH=march, MESHNODE_NATIVE_CACHE=str(native_cache_for(march)),
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_PATH], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "path ok" in out.stdout
