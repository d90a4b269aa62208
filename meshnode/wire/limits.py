"""Named limits of the wire; every incoming frame is checked against them before buffering."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 1
PREFIX_BYTES = 8  # two big-endian u32: header length, body length
TENSOR_ALIGNMENT = 64  # tensor offsets in a body, and receive buffers, are aligned to this

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 64
MAX_TENSOR_DIMS = 8
DEFAULT_REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
# Encrypted bytes handed to the transport per turn before we check whether it
# asked us to pause: bounds what a slow reader makes us hold beyond the tensors.
SEND_SLICE_BYTES = 1024 * 1024
MAX_INFLIGHT_HANDLERS = 256
# Bytes queued for a peer that does not read them, past which we stop reading
# its requests: answers to a peer that never reads cannot pile up without bound.
MAX_QUEUED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WireLimits:
    """Limits one endpoint enforces on every connection."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    max_tensors: int = MAX_TENSORS
    max_tensor_dims: int = MAX_TENSOR_DIMS
    connect_timeout: float = CONNECT_TIMEOUT
    send_slice_bytes: int = SEND_SLICE_BYTES
    max_inflight_handlers: int = MAX_INFLIGHT_HANDLERS
    max_queued_bytes: int = MAX_QUEUED_BYTES
