"""RMSNorm: float32 statistics whatever the compute dtype.

``RMSNorm`` is Llama's form (transformers' LlamaRMSNorm: normalise in float32,
cast back, then scale by the weight). Gemma's ``(1 + w)`` form is a family
quirk and lives in meshnode/model/families/gemma3.py. The float32 mean of
squares goes to a native kernel where it runs (meshnode/native/rows.cc):
XLA's own reduction sums a row differently depending on how many rows share
the call, and a batched session's outputs must not depend on its batch-mates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from meshnode import native


def mean_square(x32: jnp.ndarray) -> jnp.ndarray:
    """float32 [..., H] -> [..., 1]: the mean of squares of each row, summed in an order
    that does not depend on the number of rows (natively where the kernels run)."""
    if not native.load():
        return jnp.mean(x32 * x32, axis=-1, keepdims=True)
    rows = x32.reshape(-1, x32.shape[-1])  # [N, H]
    call = jax.ffi.ffi_call(native.ROW_MEAN_SQUARE_TARGET,
                            jax.ShapeDtypeStruct((rows.shape[0],), jnp.float32))
    return call(rows).reshape(*x32.shape[:-1], 1)  # [..., 1]


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
