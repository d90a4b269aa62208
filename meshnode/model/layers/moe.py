"""A sparse mixture of gated-MLP experts with top-k routing (Mixtral).

``MoE(x [B, T, H]) -> [B, T, H]``: router logits x @ router [H, E]; softmax
over the experts in float32; the top k per position, their probabilities
renormalised to sum to one (``normalize_top_k``, Mixtral's rule); the output
is the sum over experts, in expert order, of weight * expert(x), a weight
being 0 where the expert was not chosen. Each expert is a ``GatedMLP`` whose
weights may be quantized like any other. Every expert runs on every position
(dense, masked): exact, batch-invariant, and cheap at the sizes a CPU runs;
what a span holds is only its own layers' experts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshnode.model.layers.linear import project


class MoE(nnx.Module):
    """router [H, E] (float); experts: E GatedMLP modules; top_k experts per position."""

    def __init__(
        self, router: Any, experts: list[nnx.Module], top_k: int, normalize_top_k: bool = True
    ) -> None:
        self.router = nnx.Param(router)
        self.experts = nnx.List(experts)
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k

    def routing(self, x: jax.Array) -> jax.Array:
        """x [B, T, H] -> float32 weights [B, T, E], zero outside each position's top k."""
        logits = project(x, self.router)  # [B, T, E]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, E]
        top, chosen = jax.lax.top_k(probs, self.top_k)  # [B, T, k] x2
        if self.normalize_top_k:
            top = top / jnp.sum(top, axis=-1, keepdims=True)  # [B, T, k]
        experts = len(self.experts)
        one_hot = jax.nn.one_hot(chosen, experts, dtype=jnp.float32)  # [B, T, k, E]
        return jnp.einsum("btk,btke->bte", top, one_hot)  # [B, T, E]

    def __call__(self, x: jax.Array) -> jax.Array:
        weights = self.routing(x).astype(x.dtype)  # [B, T, E]
        out = jnp.zeros_like(x)  # [B, T, H]
        for index, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., index, None]  # [B, T, H]
        return out
