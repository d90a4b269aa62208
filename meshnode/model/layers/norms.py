"""RMSNorm: float32 statistics whatever the compute dtype.

``RMSNorm`` is Llama's form (transformers' LlamaRMSNorm: normalise in float32,
cast back, then scale by the weight). Gemma's ``(1 + w)`` form is a family
quirk and lives in meshnode/model/families/gemma3.py.

The statistic, ``mean_square``, sums the squares in a fixed pairwise tree of
elementwise adds, so a row's bits do not depend on how many rows are
normalised at once (batch invariance): XLA's own row reduction (``jnp.mean``)
changes its order from 8 rows on.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import lax


def mean_square(x: jnp.ndarray) -> jnp.ndarray:
    """mean(x * x) over the last axis, float32 [..., H] -> [..., 1], batch-invariant: the
    squares (zero-padded to a power of two) are halved and added pairwise down to one."""
    *lead, width = x.shape
    s = x * x  # [..., H]
    size = 1 << max(0, (width - 1).bit_length())
    if size != width:
        s = jnp.pad(s, [(0, 0)] * len(lead) + [(0, size - width)])  # [..., 2^k]
    while s.shape[-1] > 1:
        half = s.shape[-1] // 2
        s = s[..., :half] + s[..., half:]  # [..., 2^(k-1)]
    return s / width  # [..., 1]


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm with float32 statistics, as transformers' LlamaRMSNorm."""
    x32 = x.astype(jnp.float32)  # [..., H]
    variance = mean_square(x32)  # [..., 1]
    normed = (x32 * lax.rsqrt(variance + eps)).astype(x.dtype)  # [..., H]
    return weight.astype(x.dtype) * normed


def normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x / rms(x) in float32: [..., H] -> float32 [..., H]."""
    x32 = x.astype(jnp.float32)  # [..., H]
    variance = mean_square(x32)  # [..., 1]
    return x32 * lax.rsqrt(variance + eps)


class RMSNorm(nnx.Module):
    """weight [H]; normalises the last axis of x [..., H]."""

    def __init__(self, weight: Any, eps: float) -> None:
        self.weight = nnx.Param(weight)
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return rms_norm(x, self.weight[...], self.eps)
