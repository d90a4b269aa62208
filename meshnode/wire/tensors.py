"""Tensor payloads: wire dtypes, aligned receive buffers, zero-copy views in and out.

On the way out a tensor becomes a descriptor ``{dtype, shape, offset, nbytes}``
and a flat ``uint8`` memoryview over its own memory (no copy for C-contiguous
arrays); offsets are padded to ``TENSOR_ALIGNMENT``. On the way in the frame
body is one freshly allocated, 64-byte-aligned numpy buffer per frame, and
each tensor is a view over it: ``as_jax`` hands it to JAX without a copy
(DLPack, or ``jax.device_put`` for bfloat16, which DLPack does not carry).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from meshnode.errors import BadTensor, UnknownDtype
from meshnode.wire.limits import MAX_TENSOR_DIMS, TENSOR_ALIGNMENT

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_NAME_OF_DTYPE = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_PADDING = memoryview(bytes(TENSOR_ALIGNMENT))


@dataclass(frozen=True)
class TensorDescriptor:
    """Where one tensor lies in a frame body."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_cbor(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes}


def aligned_empty(nbytes: int, alignment: int = TENSOR_ALIGNMENT) -> np.ndarray:
    """A writable ``uint8`` buffer of ``nbytes`` whose first byte is ``alignment``-aligned."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


def align_up(n: int, alignment: int = TENSOR_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def wire_dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; ``UnknownDtype`` for dtypes the wire does not carry."""
    try:
        return _NAME_OF_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError) as exc:
        raise UnknownDtype(f"dtype {dtype} cannot travel on the wire") from exc


def _as_numpy(tensor: Any) -> np.ndarray:
    # jax.Array on CPU -> read-only numpy view, no copy; C-contiguous arrays stay as they are.
    array = np.asarray(tensor)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array


def layout_tensors(
    tensors: Sequence[Any],
) -> tuple[list[TensorDescriptor], list[memoryview], int]:
    """Descriptors, body parts (views over the tensors and padding) and the body length."""
    descriptors: list[TensorDescriptor] = []
    parts: list[memoryview] = []
    offset = 0
    for tensor in tensors:
        array = _as_numpy(tensor)
        name = wire_dtype_name(array.dtype)
        padded = align_up(offset)
        if padded > offset:
            parts.append(_PADDING[: padded - offset])
        offset = padded
        descriptors.append(TensorDescriptor(name, tuple(array.shape), offset, array.nbytes))
        if array.nbytes:
            parts.append(memoryview(array.reshape(-1).view(np.uint8)))
        offset += array.nbytes
    return descriptors, parts, offset


def parse_descriptor(raw: Any, max_dims: int = MAX_TENSOR_DIMS) -> TensorDescriptor:
    """Validate one CBOR tensor descriptor; unknown keys are ignored."""
    if not isinstance(raw, dict):
        raise BadTensor("tensor descriptor is not a map")
    dtype, shape = raw.get("dtype"), raw.get("shape")
    offset, nbytes = raw.get("offset"), raw.get("nbytes")
    if not isinstance(dtype, str):
        raise BadTensor("tensor dtype must be a string")
    if dtype not in WIRE_DTYPES:
        raise UnknownDtype(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > max_dims:
        raise BadTensor(f"tensor shape must be a list of at most {max_dims} sizes")
    if not all(_is_uint(dim) for dim in shape):
        raise BadTensor("tensor shape sizes must be non-negative integers")
    if not (_is_uint(offset) and _is_uint(nbytes)):
        raise BadTensor("tensor offset and nbytes must be non-negative integers")
    if offset % TENSOR_ALIGNMENT:
        raise BadTensor(f"tensor offset {offset} is not a multiple of {TENSOR_ALIGNMENT}")
    expected = math.prod(shape) * WIRE_DTYPES[dtype].itemsize
    if nbytes != expected:
        raise BadTensor(f"nbytes {nbytes} != shape {shape} x {dtype} ({expected})")
    return TensorDescriptor(dtype, tuple(shape), offset, nbytes)


def check_fits(descriptors: Sequence[TensorDescriptor], body_length: int) -> None:
    """``BadTensor`` when a descriptor overruns a body of ``body_length`` bytes."""
    for descriptor in descriptors:
        if descriptor.offset + descriptor.nbytes > body_length:
            raise BadTensor(
                f"tensor at {descriptor.offset}+{descriptor.nbytes} overruns a "
                f"{body_length}-byte body"
            )


def views_over(body: np.ndarray, descriptors: Sequence[TensorDescriptor]) -> tuple:
    """Numpy views over ``body`` (validated descriptors): no copy."""
    check_fits(descriptors, len(body))
    return tuple(
        body[d.offset : d.offset + d.nbytes].view(WIRE_DTYPES[d.dtype]).reshape(d.shape)
        for d in descriptors
    )


def as_jax(array: np.ndarray) -> Any:
    """A ``jax.Array`` sharing memory with ``array`` when it is aligned and writable (CPU)."""
    import jax
    import jax.numpy as jnp

    if array.dtype == WIRE_DTYPES["bfloat16"]:
        return jax.device_put(array)
    return jnp.from_dlpack(array)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
