"""The native decode attention: one new position over a layer of the KV cache.

The span's parity tests (against transformers, sliding windows included) run it
inside whole decode steps; these check it alone against a numpy reference.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from meshnode import native
from meshnode.model.layers import decode_attention

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
