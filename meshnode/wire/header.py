"""The CBOR frame header: version, message type, request id, kind, fields, tensor descriptors.

``schemas/wire.cddl`` is its definition. Decoding is split in three so the
protocol can answer as precisely as the input allows:

1. ``decode_cbor`` (bytes -> object): fails with ``MalformedFrame`` on bytes
   that are not exactly one CBOR item; the stream cannot be trusted after
   that, so the connection is closed.
2. ``envelope_of`` (object -> request id, kind): a header that is not a map or
   has no usable id is answered with a connection-level error (id 0).
3. ``parse_header`` (object -> ``Header``): any other defect is answered with
   an error frame for that request id, and the connection goes on.

Unknown keys are ignored at every level.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import cbor2

from meshnode.errors import BadRequest, BadTensor, MalformedFrame
from meshnode.wire.limits import MAX_TENSOR_DIMS, MAX_TENSORS, PROTOCOL_VERSION
from meshnode.wire.tensors import TensorDescriptor, parse_descriptor

REQUEST = "request"
RESPONSE = "response"
ERROR = "error"
KINDS = (REQUEST, RESPONSE, ERROR)
CONNECTION_LEVEL_ID = 0  # error frames about the connection itself, not one request
MAX_REQUEST_ID = 2**64 - 1


@dataclass(frozen=True)
class Header:
    """One frame header, validated."""

    type: str
    request_id: int
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[TensorDescriptor, ...] = ()
    version: int = PROTOCOL_VERSION

    def to_cbor(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "v": self.version,
            "type": self.type,
            "id": self.request_id,
            "kind": self.kind,
            "fields": self.fields,
        }
        if self.tensors:
            header["tensors"] = [descriptor.to_cbor() for descriptor in self.tensors]
        return header


def encode_header(header: Header) -> bytes:
    """Deterministic CBOR (RFC 8949 core deterministic: sorted keys, shortest forms)."""
    try:
        return cbor2.dumps(header.to_cbor(), canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise BadRequest(f"message fields are not CBOR-encodable: {exc}") from exc


def error_header(request_id: int, type_: str, code: str, message: str) -> Header:
    """The header of an error frame ``{code, message}``."""
    return Header(type_, request_id, ERROR, {"code": code, "message": message})


def decode_cbor(data: bytes) -> Any:
    """Exactly one CBOR item; ``MalformedFrame`` otherwise."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedFrame(f"header is not CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise MalformedFrame(f"{len(data) - stream.tell()} bytes after the CBOR header")
    return value


def envelope_of(raw: Any) -> tuple[int, str]:
    """The request id and kind of a decoded header; ``MalformedFrame`` when unusable."""
    if not isinstance(raw, dict):
        raise MalformedFrame(f"header is a {type(raw).__name__}, not a map")
    request_id, kind = raw.get("id"), raw.get("kind")
    if not _is_uint(request_id) or request_id > MAX_REQUEST_ID:
        raise MalformedFrame("header id must be an unsigned 64-bit integer")
    if kind not in KINDS:
        raise MalformedFrame(f"header kind must be one of {KINDS}")
    return request_id, kind


def parse_header(
    raw: Any, max_tensors: int = MAX_TENSORS, max_dims: int = MAX_TENSOR_DIMS
) -> Header:
    """Validate a decoded header (types, version, descriptors); body bounds are checked later."""
    request_id, kind = envelope_of(raw)
    version, type_ = raw.get("v"), raw.get("type")
    fields, tensors = raw.get("fields", {}), raw.get("tensors", [])
    if version != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported protocol version {version!r}")
    if not isinstance(type_, str):
        raise BadRequest("header type must be a string")
    if not isinstance(fields, dict):
        raise BadRequest("header fields must be a map")
    if not isinstance(tensors, list):
        raise BadTensor("header tensors must be a list")
    if len(tensors) > max_tensors:
        raise BadTensor(f"{len(tensors)} tensors, at most {max_tensors} per frame")
    descriptors = tuple(parse_descriptor(item, max_dims) for item in tensors)
    if kind == ERROR and not (
        isinstance(fields.get("code"), str) and isinstance(fields.get("message"), str)
    ):
        raise BadRequest("error frame fields must hold code and message strings")
    return Header(type_, request_id, kind, fields, descriptors, version)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
