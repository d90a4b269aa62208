"""A fast reader of GGUF files: metadata decoded once, tensors as memory-mapped views.

``gguf.GGUFReader`` builds a numpy view per value of every metadata array: a
262,144-token vocabulary (Gemma 3) took it 15-60 s on this machine. This
reader decodes the header with ``struct`` (string arrays in one Python loop,
numeric arrays with one ``np.frombuffer``) and gives tensors the same views
GGUFReader gives (``name``, ``tensor_type``, ``shape`` in GGUF order, and
``data``: typed for float and integer types, uint8 [..., row bytes] for
quantized ones), over one read-only memory map of the file.

Format (version 2 and 3): magic ``GGUF``, version u32, tensor count u64,
metadata count u64; metadata (key string, type u32, value); tensor infos
(name, dims count u32, dims u64[], type u32, offset u64); tensor data from the
next multiple of ``general.alignment`` (32).
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_NUMPY = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_TYPED = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor: ``shape`` in GGUF order (ne0 first), ``data`` a view into the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFHeader:
    """``fields``: metadata key -> Python value (lists for arrays); ``tensors``: in file order.

    Raises ValueError for a file that is not GGUF or is cut short."""

    def __init__(self, path: Path) -> None:
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._buffer = memoryview(self._map)
        self._at = 0
        if bytes(self._buffer[:4]) != _MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version, tensors, count = struct.unpack_from("<IQQ", self._buffer, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self._at = 24
        try:
            self.fields = {self._string(): self._value() for _ in range(count)}
            infos = [self._tensor_info() for _ in range(tensors)]
        except struct.error as exc:
            raise ValueError(f"truncated GGUF header: {exc}") from exc
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._buffer, self._at)[0]
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        text = bytes(self._buffer[self._at : self._at + length]).decode("utf-8", "replace")
        self._at += length
        return text

    def _value(self, kind: int | None = None) -> Any:
        kind = self._unpack("<I") if kind is None else kind
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
                values = np.frombuffer(self._buffer, dtype, count, self._at)
                self._at += count * dtype.itemsize
                return values.tolist()
            return [self._value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self._unpack(_SCALARS[kind])

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
        return name, dims, self._unpack("<I"), self._unpack("<Q")

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: int, offset: int):
        qtype = GGMLQuantizationType(kind)
        elements = int(np.prod(dims))
        rows = tuple(reversed(dims))
        at = start + offset
        if qtype in _TYPED:
            data = np.frombuffer(self._buffer, _TYPED[qtype], elements, at).reshape(rows)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            count = elements * size // block
            data = np.frombuffer(self._buffer, np.uint8, count, at)
            data = data.reshape(*rows[:-1], rows[-1] // block * size)
        return Tensor(name, qtype, dims, data)
