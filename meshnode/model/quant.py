"""Block-quantized weight matrices, kept quantized in memory and multiplied natively.

A ``QuantizedMatrix`` is a weight W [out, in] (Hugging Face orientation) in
blocks of 32 inputs::

    W[o, 32*b + j] = scale[o, b] * code(o, b, j) + offset[o, b]

with 4-bit codes (0..15, two per byte: ggml's Q4_0/Q4_1 layout) or 8-bit
signed codes (ggml's Q8_0). GGUF's Q4_0, Q4_1 and Q8_0 tensors map onto it
exactly (``from_gguf``); other types are dequantized to float arrays at load
time, as are all weights when the native kernels are unavailable.

``linear(x, w)`` is the one matmul the model code calls: a float weight is
[in, out] and goes to XLA; a quantized one goes to the native kernel
(``meshnode/native``) for short inputs (decode steps read 4-7x fewer bytes
than float32), and is dequantized by the kernel then multiplied by XLA for
long ones (prefill). Without the native kernels it is dequantized in the graph.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from meshnode import native

BLOCK = 32
#: inputs with at most this many rows use the fused kernel; longer ones dequantize
FUSED_MAX_ROWS = 4


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale", "offset"],
    meta_fields=["bits"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """codes uint8 [..., out, in/2] (4 bits) or int8 [..., out, in] (8 bits); scale, offset
    float32 [..., out, in/32]. Leading axes stack layers."""

    codes: Any
    scale: Any
    offset: Any
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, out, blocks = self.scale.shape
        return (*lead, out, blocks * BLOCK)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes) + int(self.scale.nbytes) + int(self.offset.nbytes)

    def __getitem__(self, index: Any) -> QuantizedMatrix:
        """Index the leading (layer) axes; the [out, in] matrix axes stay whole."""
        return self.map(lambda a: a[index])

    def map(self, fn: Callable[[Any], Any]) -> QuantizedMatrix:
        """The same matrix with fn applied to codes, scale and offset (row ops, stacking)."""
        return QuantizedMatrix(fn(self.codes), fn(self.scale), fn(self.offset), self.bits)

    def dequantize(self) -> np.ndarray:
        """W as a float32 numpy array [..., out, in]."""
        codes = _unpack(np.asarray(self.codes), self.bits, np).astype(np.float32)
        return _apply_scales(codes, np.asarray(self.scale), np.asarray(self.offset), np)


def _unpack(codes: Any, bits: int, xp: Any) -> Any:
    """Codes [..., out, in] as integers, from their packed form."""
    if bits == 8:
        return codes
    *lead, out, half = codes.shape
    blocks = codes.reshape(*lead, out, half // 16, 16)
    low, high = blocks & 0x0F, blocks >> 4
    return xp.concatenate([low, high], axis=-1).reshape(*lead, out, half * 2)


def _apply_scales(codes: Any, scale: Any, offset: Any, xp: Any) -> Any:
    *lead, out, width = codes.shape
    blocks = codes.reshape(*lead, out, width // BLOCK, BLOCK)
    return (blocks * scale[..., None] + offset[..., None]).reshape(*lead, out, width)


# --- from GGUF -------------------------------------------------------------------------

_F16 = np.dtype("<f2")


def from_gguf(qtype: GGMLQuantizationType, raw: np.ndarray, rows: int) -> QuantizedMatrix | None:
    """A GGUF tensor's raw blocks (uint8 [rows, row bytes]) as a QuantizedMatrix, exactly;
    None for types that do not map onto one (the caller dequantizes those)."""
    layout = _GGUF_LAYOUTS.get(qtype)
    if layout is None:
        return None
    block_bytes, bits = layout
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)
    scale = data[..., 0:2].copy().view(_F16)[..., 0].astype(np.float32)  # [rows, blocks]
    if qtype == GGMLQuantizationType.Q8_0:
        codes = data[..., 2:].copy().view(np.int8).reshape(rows, -1)
        offset = np.zeros_like(scale)
    elif qtype == GGMLQuantizationType.Q4_0:
        codes = data[..., 2:].reshape(rows, -1).copy()
        offset = -8.0 * scale
    else:  # Q4_1
        offset = data[..., 2:4].copy().view(_F16)[..., 0].astype(np.float32)
        codes = data[..., 4:].reshape(rows, -1).copy()
    return QuantizedMatrix(codes, scale, offset, bits)


#: GGUF type -> (bytes per 32-value block, code bits)
_GGUF_LAYOUTS = {
    GGMLQuantizationType.Q8_0: (34, 8),
    GGMLQuantizationType.Q4_0: (18, 4),
    GGMLQuantizationType.Q4_1: (20, 4),
}


def concat_rows(parts: Sequence[QuantizedMatrix]) -> QuantizedMatrix | None:
    """Matrices stacked along out (fused q/k/v, gate/up); None if their bits differ."""
    if len({p.bits for p in parts}) != 1:
        return None
    return QuantizedMatrix(
        *(np.concatenate([getattr(p, f) for p in parts], axis=-2) for f in _FIELDS),
        parts[0].bits,
    )


def stack(layers: Sequence[QuantizedMatrix]) -> QuantizedMatrix | None:
    """Per-layer matrices on a new leading axis; None if their bits or shapes differ."""
    if len({(m.bits, m.shape) for m in layers}) != 1:
        return None
    return QuantizedMatrix(
        *(np.stack([getattr(m, f) for m in layers]) for f in _FIELDS), layers[0].bits
    )


_FIELDS = ("codes", "scale", "offset")


# --- in the graph ----------------------------------------------------------------------


def is_quantized(weight: Any) -> bool:
    return isinstance(weight, QuantizedMatrix)


def linear(x: jax.Array, weight: Any) -> jax.Array:
    """x [..., in] times a weight: float [in, out] or QuantizedMatrix [out, in] -> [..., out]."""
    if not is_quantized(weight):
        return x @ weight
    *lead, width = x.shape
    out = weight.shape[-2]
    rows = x.reshape(-1, width).astype(jnp.float32)  # [N, in]
    if not native.load():
        y = rows @ dequantize(weight).T
    elif rows.shape[0] <= FUSED_MAX_ROWS:
        call = jax.ffi.ffi_call(
            native.MATMUL_TARGET, jax.ShapeDtypeStruct((rows.shape[0], out), jnp.float32)
        )
        y = call(rows, weight.codes, weight.scale, weight.offset, bits=np.int32(weight.bits))
    else:
        call = jax.ffi.ffi_call(
            native.DEQUANT_TARGET, jax.ShapeDtypeStruct((out, width), jnp.float32)
        )
        w = call(rows, weight.codes, weight.scale, weight.offset, bits=np.int32(weight.bits))
        y = jnp.einsum("ni,oi->no", rows, w)
    return y.reshape(*lead, out).astype(x.dtype)


def dequantize(weight: QuantizedMatrix) -> jax.Array:
    """W [out, in] float32, in the graph (no native kernel)."""
    codes = _unpack(weight.codes, weight.bits, jnp).astype(jnp.float32)
    return _apply_scales(codes, weight.scale, weight.offset, jnp)


def take_rows(weight: Any, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of a [rows, width] weight (an embedding lookup), float32 when quantized."""
    if not is_quantized(weight):
        return jnp.take(weight, ids, axis=0)
    picked = weight.map(lambda a: jnp.take(a, ids, axis=0))  # [..., width] codes per id
    codes = _unpack(picked.codes[..., None, :], weight.bits, jnp).astype(jnp.float32)
    return _apply_scales(codes, picked.scale[..., None, :], picked.offset[..., None, :], jnp)[
        ..., 0, :
    ]
