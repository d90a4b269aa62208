"""A decoder block, and a span of blocks, as NNX modules.

``DecoderBlock`` is the residual wiring every supported family shares::

    h = x + post_attn_norm(attention(attn_norm(x)))      # post norms: Gemma's sandwich
    y = h + post_mlp_norm(mlp(mlp_norm(h)))

the post norms being absent (identity) for the pre-norm families. Which norm,
attention and MLP go in is the family's choice (meshnode/model/families/).
``DecoderStack`` runs its blocks one after another over one span cache, block
i writing layer i of it; ``runs()`` groups consecutive blocks of identical
structure, which a scan can run as one compiled layer.

    stack = DecoderStack(blocks)
    x, cache = stack(x, positions, CacheView(k, v, layer=0, start=start, length=a))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshnode.model.layers.attention import CacheView


class DecoderBlock(nnx.Module):
    """attn_norm, attention, mlp_norm, mlp; optional post_attn_norm and post_mlp_norm."""

    def __init__(
        self,
        attn_norm: nnx.Module,
        attention: nnx.Module,
        mlp_norm: nnx.Module,
        mlp: nnx.Module,
        *,
        post_attn_norm: nnx.Module | None = None,
        post_mlp_norm: nnx.Module | None = None,
    ) -> None:
        self.attn_norm = attn_norm
        self.attention = attention
        self.post_attn_norm = post_attn_norm
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.post_mlp_norm = post_mlp_norm

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: CacheView
    ) -> tuple[jax.Array, CacheView]:
        """x [B, T, H] at absolute positions [T] -> [B, T, H]; cache layer written."""
        attended, cache = self.attention(self.attn_norm(x), positions, cache)  # [B, T, H]
        if self.post_attn_norm is not None:
            attended = self.post_attn_norm(attended)
        x = x + attended  # [B, T, H]
        out = self.mlp(self.mlp_norm(x))  # [B, T, H]
        if self.post_mlp_norm is not None:
            out = self.post_mlp_norm(out)
        return x + out, cache


class DecoderStack(nnx.Module):
    """Blocks run in order; block i reads and writes layer i of the cache."""

    def __init__(self, blocks: list[nnx.Module]) -> None:
        self.blocks = nnx.List(blocks)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: CacheView
    ) -> tuple[jax.Array, CacheView]:
        for index, block in enumerate(self.blocks):
            x, cache = block(x, positions, cache.at_layer(index))
        return x, cache


def positions_from(start: Any, length: int) -> jax.Array:
    """int32 [length]: the absolute positions of new tokens starting at ``start``."""
    return start + jnp.arange(length, dtype=jnp.int32)
