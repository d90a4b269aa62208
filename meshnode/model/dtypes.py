"""Dtype choices: storage dtypes the loaders accept, and the compute dtype per device.

Weights keep a storage dtype (float32, float16 or bfloat16); blocks compute in
float32 on CPU, where bfloat16 matmuls are 7-10 times slower, and in bfloat16
on accelerators.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_dtypes
import numpy as np

from meshnode.errors import ModelError

_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def storage_dtype(dtype: Any) -> np.dtype:
    """Normalise a dtype spec ('bfloat16', np.float16, jnp.float32...) to a numpy dtype."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError as exc:
        raise ModelError(f"not a dtype: {dtype!r}") from exc
    if name not in _DTYPES:
        raise ModelError(f"dtype {name!r} is not supported (float32, float16, bfloat16)")
    return _DTYPES[name]


def default_compute_dtype(backend: str | None = None) -> np.dtype:
    """float32 on CPU, bfloat16 on GPU/TPU."""
    backend = backend or jax.default_backend()
    return _DTYPES["float32"] if backend == "cpu" else _DTYPES["bfloat16"]
