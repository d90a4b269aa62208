"""The gated MLP: act(x W_gate) * (x W_up), then W_down (SwiGLU, GeGLU)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from meshnode.model.layers.linear import project

#: activation name (as transformers' hidden_act) -> function
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nnx.Module):
    """w_gate_up [H, 2F] (gate and up side by side; or QuantizedMatrix [2F, H]),
    w_down [F, H]: x [B, T, H] -> [B, T, H]."""

    def __init__(self, w_gate_up: Any, w_down: Any, activation: str = "silu") -> None:
        self.w_gate_up = nnx.Param(w_gate_up)
        self.w_down = nnx.Param(w_down)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = project(x, self.w_gate_up)  # [B, T, 2F]
        gate, up = jax.numpy.split(gate_up, 2, axis=-1)  # [B, T, F] each
        return project(ACTIVATIONS[self.activation](gate) * up, self.w_down)  # [B, T, H]
