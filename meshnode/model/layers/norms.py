"""RMSNorm: float32 statistics whatever the compute dtype.

``RMSNorm`` is Llama's form (transformers' LlamaRMSNorm: normalise in float32,
cast back, then scale by the weight). Gemma's ``(1 + w)`` form is a family
quirk and lives in meshnode/model/families/gemma3.py. The statistic is
``quant.mean_square``: batch-invariant where the native kernels run.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import lax

from meshnode.model.quant import mean_square


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
