"""The client's share of a model: token embedding, final norm and LM head.

``ClientHead.embed`` turns token ids into the hidden states the first block
takes; ``ClientHead.logits`` turns the last block's output into float32 logits
of the last position. A tied model has no ``lm_head`` and reuses the embedding.
The embedding and head may be ``QuantizedMatrix`` [V, H] (meshnode/model/quant.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meshnode.errors import ShapeMismatch
from meshnode.model.config import ModelConfig
from meshnode.model.layers.norms import rms_norm
from meshnode.model.quant import is_quantized, linear, take_rows


@dataclasses.dataclass(frozen=True)
class ClientParams:
    """embed [V, H], final_norm [H], lm_head [H, V] (or a QuantizedMatrix [V, H]) or None
    when tied to embed."""

    embed: Any
    final_norm: Any
    lm_head: Any | None = None


class ClientHead:
    """Embedding and logits for one model, as jitted functions over ClientParams."""

    def __init__(
        self, config: ModelConfig, params: ClientParams, compute_dtype: Any = jnp.float32
    ) -> None:
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self._params = jax.device_put({"embed": params.embed, "final_norm": params.final_norm})
        if params.lm_head is not None:
            self._params["lm_head"] = jax.device_put(params.lm_head)

    def embed(self, token_ids: Any) -> jax.Array:
        """token ids [B, T] (ints) -> hidden [B, T, H] in the compute dtype."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ShapeMismatch(f"token ids must be [batch, length], got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ShapeMismatch(f"token id out of range [0, {self.config.vocab_size})")
        return _embed(self._params["embed"], ids, compute_dtype=self.compute_dtype.name)

    def logits(self, hidden: Any) -> jax.Array:
        """hidden [B, T, H] -> float32 logits [B, V] of the last position."""
        shape = getattr(hidden, "shape", ())
        if len(shape) != 3 or shape[-1] != self.config.hidden_size:
            raise ShapeMismatch(
                f"hidden states must be [batch, length, {self.config.hidden_size}], got {shape}"
            )
        return _logits(
            self._params,
            hidden,
            eps=self.config.rms_norm_eps,
            compute_dtype=self.compute_dtype.name,
        )

    def all_logits(self, hidden: Any) -> jax.Array:
        """hidden [B, T, H] -> float32 logits [B, T, V] of every position (for checks)."""
        return _all_logits(
            self._params,
            hidden,
            eps=self.config.rms_norm_eps,
            compute_dtype=self.compute_dtype.name,
        )


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _embed(embed: jax.Array, ids: jax.Array, *, compute_dtype: str) -> jax.Array:
    return take_rows(embed, ids).astype(compute_dtype)  # [B, T, H]


def _project(params: dict, hidden: jax.Array, eps: float, compute_dtype: str) -> jax.Array:
    dtype = jnp.dtype(compute_dtype)
    x = rms_norm(hidden.astype(dtype), params["final_norm"], eps)  # [..., H]
    head = params.get("lm_head", params["embed"])
    if is_quantized(head):  # [V, H]
        return linear(x.astype(jnp.float32), head)  # [..., V]
    if "lm_head" in params:
        return jnp.einsum(
            "...h,hv->...v", x, params["lm_head"].astype(dtype), preferred_element_type=jnp.float32
        )  # [..., V]
    return jnp.einsum(
        "...h,vh->...v", x, params["embed"].astype(dtype), preferred_element_type=jnp.float32
    )  # [..., V]


@functools.partial(jax.jit, static_argnames=("eps", "compute_dtype"))
def _logits(params: dict, hidden: jax.Array, *, eps: float, compute_dtype: str) -> jax.Array:
    return _project(params, hidden[:, -1], eps, compute_dtype)  # [B, V]


@functools.partial(jax.jit, static_argnames=("eps", "compute_dtype"))
def _all_logits(params: dict, hidden: jax.Array, *, eps: float, compute_dtype: str) -> jax.Array:
    return _project(params, hidden, eps, compute_dtype)  # [B, T, V]
