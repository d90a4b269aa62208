"""The one matmul the layers call, over a float weight or a quantized one.

A float weight is [in, out] and is cast to the input's (compute) dtype; a
``QuantizedMatrix`` is [out, in] and goes to the native kernel through
``quant.linear`` (meshnode/model/quant.py).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from meshnode.model.quant import is_quantized, linear


def value(param: Any) -> Any:
    """What an ``nnx.Param`` (or a plain attribute) holds: an array or a QuantizedMatrix."""
    return param.get_value() if isinstance(param, nnx.Variable) else param


def project(x: jax.Array, weight: Any) -> jax.Array:
    """x [..., in] @ weight -> [..., out] in x's dtype."""
    w = value(weight)
    if is_quantized(w):
        return linear(x, w)
    return linear(x, w.astype(x.dtype))


def add_bias(x: jax.Array, bias: Any) -> jax.Array:
    """x [..., out] + bias [out] (None: x as it is)."""
    if bias is None:
        return x
    return x + value(bias).astype(x.dtype)
