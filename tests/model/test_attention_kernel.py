"""The native decode attention: one new position over a layer of the KV cache.

The span's parity tests (against transformers, sliding windows included) run it
inside whole decode steps; these check it alone against a numpy reference, and
check the kernels built without AVX-512 (the AVX2 and portable paths).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest

from meshnode import native
from meshnode.model.layers.attention import decode_attention

needs_native = pytest.mark.skipif(
    not native.load(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)


def _reference_attention(q, k_cache, v_cache, layer, position, window):
    """numpy: q [B, N, D] over positions [max(0, position - window + 1) if window, position]."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[3]
    first = max(0, position - window + 1) if window > 0 else 0
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(heads):
            g = n // (heads // kv_heads)
            keys = k_cache[layer, b, first : position + 1, g]  # [P, D]
            scores = keys @ q[b, n] / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            out[b, n] = (weights / weights.sum()) @ v_cache[layer, b, first : position + 1, g]
    return out


@needs_native
@pytest.mark.parametrize(
    ("position", "window"), [(0, 0), (5, 0), (40, 0), (40, 8), (3, 8), (99, 32)]
)
def test_native_decode_attention_equals_the_reference(position, window):
    """When one position attends over a layer of the cache (GQA, batch 2, sliding window or
    not), then the native kernel equals softmax(q k / sqrt(D)) v over exactly those positions."""
    rng = np.random.default_rng(position + window)
    cache_shape = (3, 2, 100, 2, 16)  # [L, B, S, K, D]
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    q = (3 * rng.standard_normal((2, 6, 16))).astype(np.float32)  # 6 heads over 2 kv heads
    got = np.asarray(jax.jit(decode_attention)(q, k_cache, v_cache, 2, position, window))
    expected = _reference_attention(q, k_cache, v_cache, 2, position, window)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@needs_native
def test_native_decode_attention_rejects_a_position_outside_the_cache():
    """When the position is past the cache, then the kernel fails with a clear error."""
    cache = np.zeros((1, 1, 16, 1, 16), np.float32)
    with pytest.raises(Exception, match="outside the cache"):
        np.asarray(decode_attention(np.zeros((1, 2, 16), np.float32), cache, cache, 0, 16, 0))


_VECTOR_PATHS_SCRIPT = """
import gguf, jax, numpy as np
from meshnode import native
from meshnode.model.layers.attention import decode_attention
from meshnode.model.quant import QuantizedMatrix, from_gguf, linear
assert native.load(), native.unavailable_reason()
rng = np.random.default_rng(0)
matrices = []
for qtype in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
    raw = gguf.quants.quantize(rng.standard_normal((19, 96)).astype(np.float32), qtype)
    matrices.append(from_gguf(qtype, raw, 19))
codes = rng.integers(-32, 32, (19, 96)).astype(np.int8)  # 16-input groups, as Q6_K's
scales, offsets = rng.random((19, 6), np.float32), np.zeros((19, 6), np.float32)
matrices.append(QuantizedMatrix(codes, scales, offsets, 8))
worst = 0.0
for matrix in matrices:
    dense = matrix.dequantize()
    for rows in (1, 9):  # fused, and dequantize-then-matmul
        x = rng.standard_normal((1, rows, 96)).astype(np.float32)
        got = np.asarray(jax.jit(linear)(x, matrix))
        worst = max(worst, float(np.abs(got - x @ dense.T).max() / np.abs(x @ dense.T).max()))
cache = rng.standard_normal((2, 1, 40, 2, 16)).astype(np.float32)
values = rng.standard_normal((2, 1, 40, 2, 16)).astype(np.float32)
q = rng.standard_normal((1, 4, 16)).astype(np.float32)
got = np.asarray(decode_attention(q, cache, values, 1, 33, 0))
for n in range(4):
    scores = cache[1, 0, :34, n // 2] @ q[0, n] / 4.0
    weights = np.exp(scores - scores.max())
    expected = (weights / weights.sum()) @ values[1, 0, :34, n // 2]
    worst = max(worst, float(np.abs(got[0, n] - expected).max()))
print(worst)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction sets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "portable"])
def test_kernels_built_without_avx512_compute_the_same(native_cache_for, march):
    """When the kernels are built for AVX2 (x86-64-v3) or plain x86-64, then the fused matmul
    and the attention still equal their references: every vector path is exercised."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        MESHNODE_NATIVE_MARCH=march,
        MESHNODE_NATIVE_CACHE=str(native_cache_for(march)),
    )
    run = subprocess.run(
        [sys.executable, "-c", _VECTOR_PATHS_SCRIPT],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-5
