"""Block-quantized weight matrices, kept quantized in memory and multiplied natively.

A ``QuantizedMatrix`` is a weight W [out, in] (Hugging Face orientation) whose
inputs share a scale and an offset in groups of G = 32 (or 16)::

    W[o, i] = scale[o, i // G] * code(o, i) + offset[o, i // G]

with 4-bit codes (0..15, two per byte: ggml's Q4_0/Q4_1 layout) or 8-bit
signed codes; 8-bit codes may also take a scale per 16 inputs. GGUF's Q4_0,
Q4_1, Q4_K (4 bits), Q5_0, Q5_1, Q5_K, Q6_K (16-input groups) and Q8_0 (8
bits) tensors map onto it exactly (``from_gguf``): the K-quants' sub-blocks
become groups whose scale and offset are the super-block scales times the
sub-block ones. Other types (Q2_K, Q3_K, float) are dequantized to float
arrays at load time, as are all weights when the native kernels are
unavailable.

``linear(x, w)`` is the one matmul the model code calls. Inputs of at most
``FUSED_MAX_ROWS`` rows (decode steps, batched or not) go to a native kernel
(``meshnode/native``): a quantized weight [out, in] to the fused one (decode
steps read 4-7x fewer bytes than float32), a float32 weight [in, out] to the
dense one. Both are batch-invariant: each row's result is bitwise what it is
when that row is multiplied alone, whatever else shares the call, which keeps a
session's outputs independent of its batch-mates. Longer inputs (prefill) are
dequantized by the kernel then multiplied by XLA (a float weight goes to XLA
as it is). Without the native kernels (``MESHNODE_NATIVE=0``, no compiler, a
GPU or TPU backend) a quantized weight is dequantized in the graph and every
matmul is XLA's, whose results may depend on the number of rows: batch
invariance is then not guaranteed (``batch_invariant()`` says which holds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from meshnode import native

BLOCK = 32
#: inputs with at most this many rows use the native (batch-invariant) kernels; longer ones
#: (prefill) dequantize and go to XLA. Decode batches of up to 64 sessions stay under it.
FUSED_MAX_ROWS = 64


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
        *lead, out, width = self.codes.shape
        return (*lead, out, width * 8 // self.bits)

    @property
    def group(self) -> int:
        """Inputs per scale: 32, or 16 (8-bit codes of Q6_K)."""
        return self.shape[-1] // self.scale.shape[-1]

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
    groups = scale.shape[-1]
    blocks = codes.reshape(*lead, out, groups, width // groups)
    return (blocks * scale[..., None] + offset[..., None]).reshape(*lead, out, width)


# --- from GGUF -------------------------------------------------------------------------

_F16 = np.dtype("<f2")


def from_gguf(qtype: GGMLQuantizationType, raw: np.ndarray, rows: int) -> QuantizedMatrix | None:
    """A GGUF tensor's raw blocks (uint8 [rows, row bytes]) as a QuantizedMatrix, exactly;
    None for types that do not map onto one (the caller dequantizes those)."""
    decode = _GGUF_DECODERS.get(qtype)
    if decode is None:
        return None
    block_bytes, bits, decoder = decode
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)
    codes, scale, offset = decoder(data)  # codes [rows, chunks of 32, 32] (or [rows, ..., 256])
    scale, offset = scale.reshape(rows, -1), offset.reshape(rows, -1)
    codes = codes.reshape(rows, -1, BLOCK)
    if bits == 4:
        packed = codes[..., :16] | (codes[..., 16:] << 4)  # ggml's nibble order
        return QuantizedMatrix(packed.astype(np.uint8).reshape(rows, -1), scale, offset, 4)
    return QuantizedMatrix(codes.astype(np.int8).reshape(rows, -1), scale, offset, 8)


def _f16(data: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of every block, as float32 [rows, blocks]."""
    return data[..., at : at + 2].copy().view(_F16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> codes 0..15 [..., 32]: low nibbles first (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits -> [..., 32] values 0 or 16 (bit j for element j)."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # [..., 32]
    return bits.astype(np.int16) << 4


def _q8_0(data):  # d, qs[32] int8: w = d * q
    scale = _f16(data, 0)
    return data[..., 2:].view(np.int8).astype(np.int16), scale, np.zeros_like(scale)


def _q4_0(data):  # d, qs[16]: w = d * (q - 8)
    scale = _f16(data, 0)
    return _nibbles(data[..., 2:]), scale, -8.0 * scale


def _q4_1(data):  # d, m, qs[16]: w = d * q + m
    return _nibbles(data[..., 4:]), _f16(data, 0), _f16(data, 2)


def _q5_0(data):  # d, qh[4], qs[16]: w = d * (q - 16), q 5 bits
    scale = _f16(data, 0)
    codes = (_nibbles(data[..., 6:]) | _high_bits(data[..., 2:6])) - 16
    return codes, scale, np.zeros_like(scale)


def _q5_1(data):  # d, m, qh[4], qs[16]: w = d * q + m
    codes = _nibbles(data[..., 8:]) | _high_bits(data[..., 4:8])
    return codes, _f16(data, 0), _f16(data, 2)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of Q4_K/Q5_K 6-bit sub-block scales and mins -> two [..., 8] arrays
    (ggml's get_scale_min_k4)."""
    q = packed.astype(np.int32)
    low_sc, low_m = q[..., 0:4] & 63, q[..., 4:8] & 63
    high_sc = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    high_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return (
        np.concatenate([low_sc, high_sc], axis=-1).astype(np.float32),
        np.concatenate([low_m, high_m], axis=-1).astype(np.float32),
    )


def _k_sub_blocks(d, dmin, packed_scales, quants):
    """quants [rows, supers, 8, 32] -> per sub-block scale d * sc and offset -dmin * m."""
    sc, m = _k_scales(packed_scales)  # [rows, supers, 8]
    scale = d[..., None] * sc
    offset = -(dmin[..., None] * m)
    return quants, scale, offset


def _q4_k(data):  # d, dmin, scales[12], qs[128]; chunks of 64: low nibbles, then high
    qs = data[..., 16:].reshape(*data.shape[:-1], 4, 32)  # [rows, supers, chunk, 32]
    quants = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*data.shape[:-1], 8, 32)
    return _k_sub_blocks(_f16(data, 0), _f16(data, 2), data[..., 4:16], quants)


def _q5_k(data):  # d, dmin, scales[12], qh[32], qs[128]; fifth bit of chunk c, half h: bit 2c+h
    qs = data[..., 48:].reshape(*data.shape[:-1], 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*data.shape[:-1], 8, 32)
    qh = data[..., 16:48]  # [rows, supers, 32]
    fifth = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [.., 8, 32]
    quants = low.astype(np.int16) | (fifth.astype(np.int16) << 4)
    return _k_sub_blocks(_f16(data, 0), _f16(data, 2), data[..., 4:16], quants)


def _q6_k(data):  # ql[128], qh[64], scales[16] int8, d; 16-value groups: w = d * sc * (q - 32)
    ql, qh = data[..., :128], data[..., 128:192]
    halves = []
    for half in range(2):
        low, high = ql[..., 64 * half : 64 * half + 64], qh[..., 32 * half : 32 * half + 32]
        parts = [
            (low[..., :32] & 0x0F) | (((high >> 0) & 3) << 4),
            (low[..., 32:] & 0x0F) | (((high >> 2) & 3) << 4),
            (low[..., :32] >> 4) | (((high >> 4) & 3) << 4),
            (low[..., 32:] >> 4) | (((high >> 6) & 3) << 4),
        ]
        halves.append(np.concatenate(parts, axis=-1))  # [rows, supers, 128]
    codes = np.concatenate(halves, axis=-1).astype(np.int16) - 32  # [rows, supers, 256]
    scale = _f16(data, 208)[..., None] * data[..., 192:208].view(np.int8).astype(np.float32)
    return codes, scale, np.zeros_like(scale)  # scale [rows, supers, 16]


#: GGUF type -> (bytes per block, code bits, decoder to (codes, scale, offset))
_GGUF_DECODERS = {
    GGMLQuantizationType.Q8_0: (34, 8, _q8_0),
    GGMLQuantizationType.Q4_0: (18, 4, _q4_0),
    GGMLQuantizationType.Q4_1: (20, 4, _q4_1),
    GGMLQuantizationType.Q5_0: (22, 8, _q5_0),
    GGMLQuantizationType.Q5_1: (24, 8, _q5_1),
    GGMLQuantizationType.Q4_K: (144, 4, _q4_k),
    GGMLQuantizationType.Q5_K: (176, 8, _q5_k),
    GGMLQuantizationType.Q6_K: (210, 8, _q6_k),
}


def concat_rows(parts: Sequence[QuantizedMatrix]) -> QuantizedMatrix:
    """Matrices stacked along out (fused q/k/v, gate/up). Parts of different forms (a
    Q4_K q beside a Q6_K v) are first brought to the widest one, exactly: 4-bit codes
    become 8-bit ones, and 32-input groups two 16-input groups of the same scale."""
    bits, group = max(p.bits for p in parts), min(p.group for p in parts)
    parts = [_widen(p, bits, group) for p in parts]
    return QuantizedMatrix(
        *(np.concatenate([getattr(p, f) for p in parts], axis=-2) for f in _FIELDS), bits
    )


def _widen(matrix: QuantizedMatrix, bits: int, group: int) -> QuantizedMatrix:
    codes, scale, offset = (np.asarray(getattr(matrix, f)) for f in _FIELDS)
    if matrix.bits != bits:  # 4 -> 8: codes 0..15 fit int8
        codes = _unpack(codes, matrix.bits, np).astype(np.int8)
    if matrix.group != group:  # 32 -> 16: each scale twice
        repeat = matrix.group // group
        scale, offset = np.repeat(scale, repeat, axis=-1), np.repeat(offset, repeat, axis=-1)
    return QuantizedMatrix(codes, scale, offset, bits)


def stack(layers: Sequence[QuantizedMatrix]) -> QuantizedMatrix | None:
    """Per-layer matrices on a new leading axis; None if their forms or shapes differ."""
    if len({(m.bits, m.group, m.shape) for m in layers}) != 1:
        return None
    return QuantizedMatrix(
        *(np.stack([getattr(m, f) for m in layers]) for f in _FIELDS), layers[0].bits
    )


_FIELDS = ("codes", "scale", "offset")


# --- in the graph ----------------------------------------------------------------------


def is_quantized(weight: Any) -> bool:
    return isinstance(weight, QuantizedMatrix)


def batch_invariant() -> bool:
    """Whether ``linear`` gives each row of up to ``FUSED_MAX_ROWS`` rows bitwise what it
    gives that row alone (for float32 inputs): True when the native kernels run here."""
    return native.load()


def linear(x: jax.Array, weight: Any) -> jax.Array:
    """x [..., in] times a weight: float [in, out] or QuantizedMatrix [out, in] -> [..., out]."""
    if not is_quantized(weight):
        return _dense(x, weight)
    *lead, width = x.shape
    out = weight.shape[-2]
    rows = x.reshape(-1, width).astype(jnp.float32)  # [N, in]
    if not native.load():
        y = rows @ dequantize(weight).T  # [N, out]
    elif rows.shape[0] <= FUSED_MAX_ROWS:
        y = fused_matmul(rows, weight)  # [N, out]
    else:
        y = dequantized_matmul(rows, weight)  # [N, out]
    return y.reshape(*lead, out).astype(x.dtype)


def fused_matmul(rows: jax.Array, weight: QuantizedMatrix) -> jax.Array:
    """rows [N, in] float32 @ weight.T by the native fused kernel -> [N, out] (batch-invariant)."""
    shape = jax.ShapeDtypeStruct((rows.shape[0], weight.shape[-2]), jnp.float32)
    call = jax.ffi.ffi_call(native.MATMUL_TARGET, shape)
    return call(rows, weight.codes, weight.scale, weight.offset, bits=np.int32(weight.bits))


def dequantized_matmul(rows: jax.Array, weight: QuantizedMatrix) -> jax.Array:
    """rows [N, in] float32 @ weight.T, the weight dequantized by the native kernel then
    multiplied by XLA -> [N, out] (for long inputs; not batch-invariant)."""
    shape = jax.ShapeDtypeStruct(weight.shape, jnp.float32)
    call = jax.ffi.ffi_call(native.DEQUANT_TARGET, shape)
    w = call(rows, weight.codes, weight.scale, weight.offset, bits=np.int32(weight.bits))
    return jnp.einsum("ni,oi->no", rows, w)  # [N, out]


def _dense(x: jax.Array, weight: Any) -> jax.Array:
    """x [..., in] @ float weight [in, out]: the native dense kernel for short float32 inputs
    (batch-invariant), else XLA."""
    *lead, width = x.shape
    rows = math.prod(lead)
    native_ok = x.dtype == jnp.float32 and weight.dtype == jnp.float32 and weight.ndim == 2
    if not (native_ok and 0 < rows <= FUSED_MAX_ROWS and native.load()):
        return x @ weight
    return dense_matmul(x.reshape(rows, width), weight).reshape(*lead, weight.shape[-1])


def dense_matmul(rows: jax.Array, weight: Any) -> jax.Array:
    """rows [N, in] float32 @ weight [in, out] float32 by the native dense kernel -> [N, out]
    (batch-invariant)."""
    shape = jax.ShapeDtypeStruct((rows.shape[0], weight.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(native.DENSE_TARGET, shape)(rows, weight)


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
