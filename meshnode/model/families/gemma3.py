"""Gemma 3 blocks: the generic layers with Gemma's quirks.

- RMSNorm scales by ``(1 + w)`` in float32 (``GemmaRMSNorm``), everywhere:
  the four norms of a block, the per-head q/k norms and the final norm;
- "sandwich" norms: the attention and MLP outputs are normalised again before
  their residual adds;
- GeGLU MLP (``gelu_pytorch_tanh``);
- scores scaled by ``query_pre_attn_scalar ** -0.5``, optionally softcapped;
- sliding-window (local) layers with their own rope base (``local_rope``,
  10000) between global layers (every 6th by default) on ``rope``;
- the embedding multiplied by sqrt(hidden) (see ``head_spec``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from meshnode.model.config import ModelConfig
from meshnode.model.families.llama import attention_spec
from meshnode.model.families.registry import HeadSpec
from meshnode.model.layers.attention import Attention
from meshnode.model.layers.block import DecoderBlock
from meshnode.model.layers.mlp import GatedMLP
from meshnode.model.layers.norms import RMSNorm, normalize


class GemmaRMSNorm(RMSNorm):
    """out = normalize(x) * (1 + w), all in float32, cast back to x's dtype."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = 1.0 + self.weight[...].astype(jnp.float32)  # [H]
        return (normalize(x, self.eps) * scale).astype(x.dtype)


def head_spec(config: ModelConfig) -> HeadSpec:
    return HeadSpec(norm_offset=1.0, embed_scale=math.sqrt(config.hidden_size))


def build_block(config: ModelConfig, index: int, params: dict) -> DecoderBlock:
    eps = config.rms_norm_eps
    attention = Attention(
        attention_spec(config, index),
        params["wqkv"],
        params["wo"],
        bqkv=params.get("bqkv"),
        bo=params.get("bo"),
        q_norm=GemmaRMSNorm(params["q_norm"], eps),
        k_norm=GemmaRMSNorm(params["k_norm"], eps),
    )
    return DecoderBlock(
        GemmaRMSNorm(params["attn_norm"], eps),
        attention,
        GemmaRMSNorm(params["mlp_norm"], eps),
        GatedMLP(params["w_gate_up"], params["w_down"], config.activation),
        post_attn_norm=GemmaRMSNorm(params["post_attn_norm"], eps),
        post_mlp_norm=GemmaRMSNorm(params["post_mlp_norm"], eps),
    )
