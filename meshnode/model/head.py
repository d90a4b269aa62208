"""The client's share of a model: token embedding, final norm and LM head.

``ClientHead.embed`` turns token ids into the hidden states the first block
takes; ``ClientHead.logits`` turns the last block's output into float32 logits
of the last position. A tied model has no ``lm_head`` and reuses the embedding.
The embedding and head may be ``QuantizedMatrix`` [V, H] (meshnode/model/quant.py).
Family quirks come from the family's ``HeadSpec`` (meshnode/model/families/):
Gemma scales the embedding by sqrt(hidden) (cast to the compute dtype first,
as transformers casts it to the weights' dtype), its final norm scales by
``(1 + w)``; a config's ``final_softcap`` caps the logits with tanh.

Batch invariance: with float32 compute, a quantized head on the native
kernels (``batch_invariant``) gives each row of ``logits`` over B rows bitwise
that row's logits alone (the norm's statistic is a fixed tree, the projection
the fused kernel's; the rest is elementwise), and so is each row of ``embed``
(a gather). A float head stays on XLA's matmul: the native dense kernel is
row-invariant too, but for one row it measured about 2x slower than XLA's on
a vocabulary-sized head (6-11 against 5-6 ms for SmolLM2 in float), which
cost float checkpoints a quarter of their single-session decode rate. So a
float head is not batch-invariant, and the client does not batch it
(``meshnode.client.generate.HeadCompute``). Elsewhere (no native kernels,
bfloat16) rows may differ in their last bits with the batch size.
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
from meshnode.model.families.registry import head_spec
from meshnode.model.layers.norms import normalize, rms_norm
from meshnode.model.quant import batch_invariant as quant_batch_invariant
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
        spec = head_spec(config)
        self._static = {
            "eps": config.rms_norm_eps,
            "norm_offset": spec.norm_offset,
            "softcap": config.final_softcap,
            "compute_dtype": self.compute_dtype.name,
        }
        self._embed_scale = spec.embed_scale
        self._params = jax.device_put({"embed": params.embed, "final_norm": params.final_norm})
        if params.lm_head is not None:
            self._params["lm_head"] = jax.device_put(params.lm_head)
        self._quantized_head = is_quantized(
            params.embed if params.lm_head is None else params.lm_head)

    @property
    def batch_invariant(self) -> bool:
        """Whether a row of ``logits`` and ``embed`` for B rows is bitwise that row's result
        alone (B <= ``quant.FUSED_MAX_ROWS``): float32 compute, a quantized head, the native
        kernels."""
        return (self.compute_dtype == jnp.float32 and self._quantized_head
                and quant_batch_invariant())

    def embed(self, token_ids: Any) -> jax.Array:
        """token ids [B, T] (ints) -> hidden [B, T, H] in the compute dtype."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ShapeMismatch(f"token ids must be [batch, length], got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ShapeMismatch(f"token id out of range [0, {self.config.vocab_size})")
        return _embed(
            self._params["embed"],
            ids,
            scale=self._embed_scale,
            compute_dtype=self.compute_dtype.name,
        )

    def logits(self, hidden: Any) -> jax.Array:
        """hidden [B, T, H] -> float32 logits [B, V] of the last position."""
        shape = getattr(hidden, "shape", ())
        if len(shape) != 3 or shape[-1] != self.config.hidden_size:
            raise ShapeMismatch(
                f"hidden states must be [batch, length, {self.config.hidden_size}], got {shape}"
            )
        return _logits(self._params, hidden, **self._static)

    def all_logits(self, hidden: Any) -> jax.Array:
        """hidden [B, T, H] -> float32 logits [B, T, V] of every position (for checks)."""
        return _all_logits(self._params, hidden, **self._static)


@functools.partial(jax.jit, static_argnames=("scale", "compute_dtype"))
def _embed(
    embed: jax.Array, ids: jax.Array, *, scale: float | None, compute_dtype: str
) -> jax.Array:
    rows = take_rows(embed, ids).astype(compute_dtype)  # [B, T, H]
    if scale is None:
        return rows
    return rows * jnp.asarray(scale, dtype=compute_dtype)  # [B, T, H]


def _project(
    params: dict,
    hidden: jax.Array,
    eps: float,
    norm_offset: float,
    softcap: float | None,
    compute_dtype: str,
) -> jax.Array:
    dtype = jnp.dtype(compute_dtype)
    x = hidden.astype(dtype)  # [..., H]
    if norm_offset:
        weight = norm_offset + params["final_norm"].astype(jnp.float32)  # [H]
        x = (normalize(x, eps) * weight).astype(dtype)  # [..., H]
    else:
        x = rms_norm(x, params["final_norm"], eps)  # [..., H]
    logits = _head(params, x, dtype)  # [..., V]
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def _head(params: dict, x: jax.Array, dtype: Any) -> jax.Array:
    head = params.get("lm_head", params["embed"])
    if is_quantized(head):  # [V, H]
        return linear(x.astype(jnp.float32), head)  # [..., V]
    if "lm_head" in params:  # XLA's matmul: see "Batch invariance" above
        return jnp.einsum(
            "...h,hv->...v", x, params["lm_head"].astype(dtype), preferred_element_type=jnp.float32
        )  # [..., V]
    return jnp.einsum(
        "...h,vh->...v", x, params["embed"].astype(dtype), preferred_element_type=jnp.float32
    )  # [..., V]


_STATIC = ("eps", "norm_offset", "softcap", "compute_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _logits(params: dict, hidden: jax.Array, **static: Any) -> jax.Array:
    return _project(params, hidden[:, -1], **static)  # [B, V]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _all_logits(params: dict, hidden: jax.Array, **static: Any) -> jax.Array:
    return _project(params, hidden, **static)  # [B, T, V]
