"""From named checkpoint tensors to the engine's parameter trees.

Both weight formats are read through a ``TensorReader``: a lookup by Hugging
Face tensor name (``model.layers.3.self_attn.q_proj.weight``) that returns a
numpy array in HF layout ([out, in] for projections). This module renames,
checks each tensor's shape against the config, transposes to [in, out], fuses
q/k/v and gate/up, casts to the storage dtype, and stacks a span's layers on a
leading axis. Only the tensors of the requested blocks are read.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from meshnode.errors import MissingWeights, ModelError, ShapeMismatch
from meshnode.model.config import ModelConfig
from meshnode.model.dtypes import storage_dtype
from meshnode.model.head import ClientParams
from meshnode.model.span import SpanParams


class TensorReader(Protocol):
    """Named tensors of one checkpoint, read on demand."""

    def has(self, name: str) -> bool: ...

    def read(self, name: str) -> np.ndarray: ...


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


def _fetch(reader: TensorReader, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not reader.has(name):
        raise MissingWeights(f"checkpoint lacks tensor {name!r}")
    array = reader.read(name)
    if tuple(array.shape) != shape:
        raise ShapeMismatch(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
    return array


def layer_tensors(config: ModelConfig, reader: TensorReader, index: int) -> dict[str, np.ndarray]:
    """One layer's parameters (see meshnode/model/layers.py), float32, fused, [in, out]."""
    c, p = config, layer_prefix(index)
    h, q, kv, f = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    attn, mlp = p + "self_attn.", p + "mlp."

    def weight(name: str, out_dim: int, in_dim: int) -> np.ndarray:
        return _fetch(reader, name, (out_dim, in_dim)).astype(np.float32).T  # [in, out]

    def vector(name: str, size: int) -> np.ndarray:
        return _fetch(reader, name, (size,)).astype(np.float32)

    params = {
        "attn_norm": vector(p + "input_layernorm.weight", h),
        "wqkv": np.concatenate(
            [
                weight(attn + "q_proj.weight", q, h),
                weight(attn + "k_proj.weight", kv, h),
                weight(attn + "v_proj.weight", kv, h),
            ],
            axis=1,
        ),  # [H, Q + 2KV]
        "wo": weight(attn + "o_proj.weight", h, q),  # [Q, H]
        "mlp_norm": vector(p + "post_attention_layernorm.weight", h),
        "w_gate_up": np.concatenate(
            [weight(mlp + "gate_proj.weight", f, h), weight(mlp + "up_proj.weight", f, h)], axis=1
        ),  # [H, 2F]
        "w_down": weight(mlp + "down_proj.weight", h, f),  # [F, H]
    }
    if c.qkv_bias:
        params["bqkv"] = np.concatenate(
            [
                vector(attn + "q_proj.bias", q),
                vector(attn + "k_proj.bias", kv),
                vector(attn + "v_proj.bias", kv),
            ]
        )  # [Q + 2KV]
    if c.o_bias:
        params["bo"] = vector(attn + "o_proj.bias", h)
    return params


def span_params(
    config: ModelConfig, reader: TensorReader, start: int, end: int, dtype: Any
) -> SpanParams:
    """Blocks [start, end) stacked on a leading axis, in the storage dtype."""
    if not 0 <= start < end <= config.num_layers:
        raise ModelError(f"span [{start}, {end}) is outside the model's {config.num_layers} blocks")
    target = storage_dtype(dtype)
    stacked: dict[str, np.ndarray] = {}
    for offset, index in enumerate(range(start, end)):
        for name, array in layer_tensors(config, reader, index).items():
            if name not in stacked:
                stacked[name] = np.empty((end - start, *array.shape), dtype=target)
            stacked[name][offset] = array.astype(target)
    return SpanParams(start=start, end=end, layers=stacked)


def client_params(config: ModelConfig, reader: TensorReader, dtype: Any) -> ClientParams:
    """Embedding, final norm and (untied models) LM head, in the storage dtype."""
    target = storage_dtype(dtype)
    h, v = config.hidden_size, config.vocab_size
    embed = _fetch(reader, "model.embed_tokens.weight", (v, h)).astype(target)  # [V, H]
    norm = _fetch(reader, "model.norm.weight", (h,)).astype(target)  # [H]
    lm_head = None
    if not config.tie_word_embeddings:
        lm_head = np.ascontiguousarray(
            _fetch(reader, "lm_head.weight", (v, h)).astype(target).T
        )  # [H, V]
    return ClientParams(embed=embed, final_norm=norm, lm_head=lm_head)
