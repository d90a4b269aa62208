"""Mixtral blocks: Mistral's attention and norms, a sparse mixture of SwiGLU experts.

The router picks ``experts_per_token`` of ``num_experts`` experts per position
(softmax, top k, renormalised); see meshnode/model/layers/moe.py.
"""

from __future__ import annotations

from meshnode.model.config import ModelConfig
from meshnode.model.families.llama import attention_spec
from meshnode.model.families.registry import HeadSpec
from meshnode.model.layers.attention import Attention
from meshnode.model.layers.block import DecoderBlock
from meshnode.model.layers.mlp import GatedMLP
from meshnode.model.layers.moe import MoE
from meshnode.model.layers.norms import RMSNorm
from meshnode.model.weights import expert_name


def head_spec(config: ModelConfig) -> HeadSpec:
    return HeadSpec()


def build_block(config: ModelConfig, index: int, params: dict) -> DecoderBlock:
    eps = config.rms_norm_eps
    experts = [
        GatedMLP(
            params[expert_name(e, "w_gate_up")],
            params[expert_name(e, "w_down")],
            config.activation,
        )
        for e in range(config.num_experts)
    ]
    return DecoderBlock(
        RMSNorm(params["attn_norm"], eps),
        Attention(attention_spec(config, index), params["wqkv"], params["wo"]),
        RMSNorm(params["mlp_norm"], eps),
        MoE(params["router"], experts, config.experts_per_token),
    )
