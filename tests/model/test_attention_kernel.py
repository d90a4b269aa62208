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
from meshnode.model.layers.attention import (
    decode_attention,
    paged_decode_attention,
    session_prefill_attention,
)

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


def _paged_reference(q, k_arena, v_arena, layer, positions, tables, window):
    """numpy: row r of q [R, N, D] over its positions up to positions[r] in its pages."""
    page = k_arena.shape[2]
    out = np.zeros_like(q)
    for r, position in enumerate(positions):
        slots = [(tables[r, i // page], i % page) for i in range(position + 1)]
        keys = np.stack([k_arena[layer, p, o] for p, o in slots])[None, None]  # [1, 1, S, K, D]
        values = np.stack([v_arena[layer, p, o] for p, o in slots])[None, None]
        out[r] = _reference_attention(q[r : r + 1], keys, values, 0, position, window)[0]
    return out


@needs_native
@pytest.mark.parametrize(("start", "window"), [(0, 0), (150, 0), (150, 40)])
def test_a_paged_chunk_is_each_query_over_its_causal_prefix(start, window):
    """When a prefill chunk of 120 positions goes to the native paged kernel as one row per
    query (its page table repeated, enough positions read to share them among threads),
    then each query equals softmax attention over exactly its causal prefix (and window), and
    is bitwise what the same query computes alone, as a decode step would."""
    rng = np.random.default_rng(start + window)
    arena_shape = (2, 11, 32, 2, 16)  # [L, pages, P, K, D]: 10 pages of 32 positions + scratch
    k_arena = rng.standard_normal(arena_shape).astype(np.float32)
    v_arena = rng.standard_normal(arena_shape).astype(np.float32)
    table = np.array([5, 2, 8, 1, 10, 7, 3, 9, 6, 4], np.int32)  # pages out of order
    length = 120
    q = (3 * rng.standard_normal((length, 6, 16))).astype(np.float32)  # [R, N, D]
    positions = np.arange(start, start + length, dtype=np.int32)  # [R]
    tables = np.repeat(table[None], length, axis=0)  # [R, M]
    call = jax.jit(paged_decode_attention, static_argnums=(3, 6))
    chunk = np.asarray(call(q, k_arena, v_arena, 1, positions, tables, window))
    expected = _paged_reference(q, k_arena, v_arena, 1, positions, tables, window)
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-5)
    alone = [np.asarray(call(q[r : r + 1], k_arena, v_arena, 1, positions[r : r + 1],
                             tables[r : r + 1], window)) for r in range(0, length, 17)]
    np.testing.assert_array_equal(np.concatenate(alone), chunk[::17])


@needs_native
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(9, 3, 64), (4, 1, 256), (8, 1, 48), (16, 2, 64), (12, 1, 32), (6, 2, 40)],
    ids=["smollm2", "gemma3", "8-per-kv-48", "8-per-kv-64", "12-per-kv", "dim-40"],
)
def test_paged_rows_of_every_head_shape_equal_the_reference(heads, kv_heads, dim):
    """When rows at different positions (page edges, past prefetch distance) attend with
    any grouping of query heads over kv heads and any head dim (register passes of 64, 32
    or 16 value lanes, a scalar tail, more heads per kv head than fit in registers), then
    each row equals softmax attention over its positions, and is bitwise the row alone."""
    rng = np.random.default_rng(heads * 1000 + dim)
    arena_shape = (2, 9, 16, kv_heads, dim)  # [L, pages, P, K, D]
    k_arena = rng.standard_normal(arena_shape).astype(np.float32)
    v_arena = rng.standard_normal(arena_shape).astype(np.float32)
    positions = np.array([0, 15, 16, 37, 100, 127], np.int32)
    tables = np.stack([rng.permutation(np.arange(1, 9)).astype(np.int32) for _ in positions])
    q = (3 * rng.standard_normal((len(positions), heads, dim))).astype(np.float32)
    call = jax.jit(paged_decode_attention, static_argnums=(3, 6))
    got = np.asarray(call(q, k_arena, v_arena, 1, positions, tables, 0))
    expected = _paged_reference(q, k_arena, v_arena, 1, positions, tables, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for r in (0, 3, 5):
        alone = call(q[r : r + 1], k_arena, v_arena, 1, positions[r : r + 1],
                     tables[r : r + 1], 0)
        np.testing.assert_array_equal(np.asarray(alone)[0], got[r])


@needs_native
@pytest.mark.parametrize("window", [0, 8])
def test_a_prefill_over_a_session_cache_is_each_query_over_its_causal_prefix(window):
    """When a prefill of 40 positions (from 20, batch 2, GQA) attends over session caches
    [L, B, S, K, D] through the native kernel, then each query equals softmax attention over
    its causal prefix (and window), bitwise what a decode step at its position computes."""
    rng = np.random.default_rng(window)
    cache_shape = (2, 2, 96, 2, 16)  # [L, B, S, K, D]: S a multiple of 16, not of 64
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    q = (3 * rng.standard_normal((2, 40, 6, 16))).astype(np.float32)  # [B, T, N, D]
    positions = np.arange(20, 60, dtype=np.int32)  # [T]
    call = jax.jit(session_prefill_attention, static_argnums=(3, 5))
    got = np.asarray(call(q, k_cache, v_cache, 1, positions, window))  # [B, T, N, D]
    for t in (0, 7, 39):
        expected = _reference_attention(q[:, t], k_cache, v_cache, 1, int(positions[t]), window)
        np.testing.assert_allclose(got[:, t], expected, rtol=1e-5, atol=1e-5)
        decoded = decode_attention(q[:, t], k_cache, v_cache, 1, int(positions[t]), window)
        np.testing.assert_array_equal(got[:, t], np.asarray(decoded))


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
