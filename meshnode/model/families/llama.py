"""Llama, Mistral, Qwen2, Qwen3 and Phi-3 blocks: pre-norm, RMSNorm, SwiGLU.

They differ only in what the config says: biases on q/k/v (Qwen2) or on all
projections (Llama ``attention_bias``), a sliding window (Mistral, some Qwen2
layers), per-head RMSNorm of q and k (Qwen3), longrope (Phi-3, whose fused
checkpoint projections the loader splits nowhere: they are already our form).
"""

from __future__ import annotations

from meshnode.model.config import ModelConfig
from meshnode.model.families.registry import HeadSpec
from meshnode.model.layers.attention import Attention, AttentionSpec
from meshnode.model.layers.block import DecoderBlock
from meshnode.model.layers.mlp import GatedMLP
from meshnode.model.layers.norms import RMSNorm
from meshnode.model.rope import layer_frequencies, long_frequencies


def head_spec(config: ModelConfig) -> HeadSpec:
    return HeadSpec()


def attention_spec(config: ModelConfig, index: int) -> AttentionSpec:
    return AttentionSpec(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        inv_freq=layer_frequencies(config, index),
        window=config.layer_windows[index],
        scale=None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar**-0.5,
        softcap=config.attn_softcap,
        inv_freq_long=long_frequencies(config),
        long_after=config.rope.original_max_position_embeddings if long_frequencies(config) else 0,
        rope_scale=config.rope.attention_factor,
    )


def build_block(config: ModelConfig, index: int, params: dict) -> DecoderBlock:
    eps = config.rms_norm_eps
    q_norm = k_norm = None
    if config.qk_norm:
        q_norm, k_norm = RMSNorm(params["q_norm"], eps), RMSNorm(params["k_norm"], eps)
    attention = Attention(
        attention_spec(config, index),
        params["wqkv"],
        params["wo"],
        bqkv=params.get("bqkv"),
        bo=params.get("bo"),
        q_norm=q_norm,
        k_norm=k_norm,
    )
    return DecoderBlock(
        RMSNorm(params["attn_norm"], eps),
        attention,
        RMSNorm(params["mlp_norm"], eps),
        GatedMLP(params["w_gate_up"], params["w_down"], config.activation),
    )
