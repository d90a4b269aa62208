"""The decoder block as pure functions over a parameter dict.

One layer's parameters (the span stacks these on a leading layer axis):

=============  ==================  ==========================================
name           shape               meaning
=============  ==================  ==========================================
attn_norm      [H]                 RMSNorm before attention
wqkv           [H, Q + 2*KV]       q, k and v projections side by side
bqkv           [Q + 2*KV]          their biases (Qwen2, Llama attention_bias)
wo             [Q, H]              output projection
bo             [H]                 its bias (Llama attention_bias only)
mlp_norm       [H]                 RMSNorm before the MLP
w_gate_up      [H, 2*F]            SwiGLU gate and up projections side by side
w_down         [F, H]              SwiGLU down projection
=============  ==================  ==========================================

with Q = heads * head_dim and KV = kv_heads * head_dim. Fusing q/k/v and gate/up
halves the number of matmuls a decode step dispatches. A projection may instead
be a ``QuantizedMatrix`` in [out, in] orientation (meshnode/model/quant.py):
every projection goes through ``quant.linear``, which takes either form. Norm
statistics, the softmax and the residual stream's rotary math run in float32
whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from meshnode import native
from meshnode.model.config import ModelConfig
from meshnode.model.quant import linear
from meshnode.model.rope import apply_rope

#: additive mask value; finite so fully masked (padding) rows stay NaN-free
MASK_VALUE = -1e30


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm with float32 statistics, as transformers' LlamaRMSNorm."""
    x32 = x.astype(jnp.float32)  # [..., H]
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)  # [..., 1]
    normed = (x32 * lax.rsqrt(variance + eps)).astype(x.dtype)  # [..., H]
    return weight.astype(x.dtype) * normed


def attention_mask(q_positions: jnp.ndarray, kv_length: int, window: jnp.ndarray) -> jnp.ndarray:
    """bool [T, A]: causal, and within ``window`` positions when window > 0."""
    kv_positions = jnp.arange(kv_length)[None, :]  # [1, A]
    q = q_positions[:, None]  # [T, 1]
    causal = kv_positions <= q  # [T, A]
    in_window = jnp.where(window > 0, kv_positions > q - window, True)  # [T, A]
    return causal & in_window


def attention(
    config: ModelConfig,
    layer: dict,
    x: jnp.ndarray,
    rope: tuple[jnp.ndarray, jnp.ndarray],
    mask: jnp.ndarray,
    cache: tuple[jnp.ndarray, jnp.ndarray],
    cache_index: tuple,
    window: Any = 0,
) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    """Self-attention of x [B, T, H] over the cache after writing x's keys and values.

    ``cache`` is the span's (k, v), each [L, B, S, K, D]; ``cache_index`` is
    (layer, start) where this layer's new positions go; ``mask`` [T, A] is
    causal and within ``window`` (0: none) over the first A cache positions.
    Returns the attention output [B, T, H] (before the residual add) and the
    updated cache. One float32 position (a decode step) goes to the native
    kernel where it runs, which reads the cache in place.
    """
    batch, length, _ = x.shape
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    groups = heads // kv_heads
    kv_length = mask.shape[-1]
    layer_index, start = cache_index

    qkv = linear(x, layer["wqkv"])  # [B, T, Q + 2KV]
    if "bqkv" in layer:
        qkv = qkv + layer["bqkv"]
    q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    q = apply_rope(q.reshape(batch, length, heads, dim), *rope)  # [B, T, N, D]
    k = apply_rope(k.reshape(batch, length, kv_heads, dim), *rope)  # [B, T, K, D]
    v = v.reshape(batch, length, kv_heads, dim)  # [B, T, K, D]

    k_cache, v_cache = cache
    at = (layer_index, 0, start, 0, 0)
    k_cache = lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
    v_cache = lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
    if length == 1 and q.dtype == k_cache.dtype == jnp.float32 and native.load():
        out = decode_attention(q[:, 0], k_cache, v_cache, layer_index, start, window)
        out = linear(out.reshape(batch, length, heads * dim), layer["wo"])  # [B, 1, H]
        if "bo" in layer:
            out = out + layer["bo"]
        return out, (k_cache, v_cache)
    visible = (1, batch, kv_length, kv_heads, dim)
    keys = lax.dynamic_slice(k_cache, (layer_index, 0, 0, 0, 0), visible)[0]  # [B, A, K, D]
    values = lax.dynamic_slice(v_cache, (layer_index, 0, 0, 0, 0), visible)[0]  # [B, A, K, D]

    q = q.reshape(batch, length, kv_heads, groups, dim)  # [B, T, K, G, D]
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32
    )  # [B, K, G, T, A]
    scores = scores * (dim**-0.5)
    scores = jnp.where(mask[None, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)  # [B, K, G, T, A]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(x.dtype))  # [B, T, K, G, D]
    out = linear(out.reshape(batch, length, heads * dim), layer["wo"])  # [B, T, H]
    if "bo" in layer:
        out = out + layer["bo"]
    return out, (k_cache, v_cache)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer_index: Any,
    position: Any,
    window: Any,
) -> jax.Array:
    """q [B, N, D] of one position over layer ``layer_index`` of the float32 caches
    [L, B, S, K, D], positions [position - window + 1 (window > 0), position]: the
    native kernel (meshnode/native/attention.cc). Returns [B, N, D]."""

    def scalar(value: Any) -> jax.Array:
        return jnp.asarray(value, dtype=jnp.int32).reshape(())

    call = jax.ffi.ffi_call(native.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, scalar(layer_index), scalar(position), scalar(window))


def mlp(layer: dict, x: jnp.ndarray) -> jnp.ndarray:
    """SwiGLU: x [B, T, H] -> [B, T, H]."""
    gate_up = linear(x, layer["w_gate_up"])  # [B, T, 2F]
    gate, up = jnp.split(gate_up, 2, axis=-1)  # [B, T, F] each
    return linear(jax.nn.silu(gate) * up, layer["w_down"])  # [B, T, H]


def decoder_block(
    config: ModelConfig,
    layer: dict,
    x: jnp.ndarray,
    rope: tuple[jnp.ndarray, jnp.ndarray],
    mask: jnp.ndarray,
    cache: tuple[jnp.ndarray, jnp.ndarray],
    cache_index: tuple,
    window: Any = 0,
) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    """One pre-norm decoder layer: x [B, T, H] -> [B, T, H], cache updated."""
    eps = config.rms_norm_eps
    attended, cache = attention(
        config,
        layer,
        rms_norm(x, layer["attn_norm"], eps),
        rope,
        mask,
        cache,
        cache_index,
        window,
    )
    x = x + attended  # [B, T, H]
    x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], eps))  # [B, T, H]
    return x, cache
