"""Rotary position embeddings: inverse frequencies per rope type, and their application.

The frequencies are computed once on the host in float32 the way transformers
computes them (``default``, ``linear``, Llama 3's ``llama3`` smoothing and
Phi-3's ``longrope``: short factors while a call's last position is within
the original context, long ones beyond, as transformers switches per forward),
or as llama.cpp does from a GGUF's per-pair ``rope_freqs`` divisors;
``apply_rope`` uses the half-rotation layout of Hugging Face checkpoints
(GGUF q/k weights are un-permuted into that layout when loaded).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from meshnode.model.config import ModelConfig, RopeConfig


def long_frequencies(config: ModelConfig) -> tuple[float, ...]:
    """longrope's inverse frequencies beyond the original context (() for other types)."""
    rope = config.rope
    if rope.rope_type != "longrope":
        return ()
    return tuple(float(f) for f in _longrope(config.head_dim, rope, rope.long_factor))


def _longrope(dim: int, rope: RopeConfig, factors: tuple[float, ...]) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = np.power(np.float32(rope.theta), exponents).astype(np.float32)  # [D/2]
    return (1.0 / (np.asarray(factors, dtype=np.float32) * powers)).astype(np.float32)


def layer_frequencies(config: ModelConfig, index: int) -> tuple[float, ...]:
    """Layer ``index``'s inverse frequencies as a hashable tuple: ``local_rope`` for a
    sliding-window layer of a model that has one (Gemma 3), else ``rope``."""
    rope = config.rope
    if config.local_rope is not None and config.layer_windows[index] > 0:
        rope = config.local_rope
    return tuple(float(f) for f in inverse_frequencies(config, rope))


def inverse_frequencies(config: ModelConfig, rope: RopeConfig | None = None) -> np.ndarray:
    """float32 [head_dim // 2]: the rotation speed of each pair of channels."""
    rope = config.rope if rope is None else rope
    dim = config.head_dim
    if rope.rope_type == "longrope":
        return _longrope(dim, rope, rope.short_factor)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(rope.theta), exponents)).astype(np.float32)  # [D/2]
    if rope.freq_factors:
        inv_freq = (inv_freq / np.asarray(rope.freq_factors, dtype=np.float32)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, rope)
    return inv_freq


def _llama3_frequencies(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)  # [D/2]
    smooth = (old_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )  # [D/2]
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled  # [D/2]
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)  # [D/2]
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    inv_freq: jnp.ndarray, positions: jnp.ndarray, scale: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [T, D] for integer positions [T], times ``scale`` (longrope's
    attention factor)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [T, D]
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, heads, D] by the tables [T, D]; math in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)  # [B, T, h, D]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)  # [B, T, h, D]
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]  # [B, T, h, D]
    return out.astype(x.dtype)
