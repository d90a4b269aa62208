"""The ``infer.*`` messages (``schemas/inference.cddl``): built by clients, parsed by workers.

Each ``build_*`` gives the ``Message`` a client sends; each ``parse_*`` checks
a received message's fields and raises ``BadRequest`` / ``BadTensor`` on junk,
so handlers see typed values. Replies are ``<type>.ok``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meshnode.errors import BadRequest, BadTensor
from meshnode.inference.records import PROTOCOL_VERSION, SESSION_ID_BYTES, BlockSpan
from meshnode.wire.message import Message

INFO, OPEN, STEP, CLOSE = "infer.info", "infer.open", "infer.step", "infer.close"

#: dtypes hidden states may travel in; the worker computes in its own dtype
WIRE_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def reply_type(request_type: str) -> str:
    return f"{request_type}.ok"


@dataclass(frozen=True)
class OpenRequest:
    model: str
    span: BlockSpan
    max_length: int


@dataclass(frozen=True)
class StepRequest:
    session_id: bytes
    span: BlockSpan
    start: int
    hidden: np.ndarray


def build_info() -> Message:
    return Message(INFO, {"v": PROTOCOL_VERSION})


def build_open(model: str, span: BlockSpan, max_length: int) -> Message:
    return Message(
        OPEN,
        {"v": PROTOCOL_VERSION, "model": model, "span": span.to_wire(), "max_length": max_length},
    )


def build_step(session_id: bytes, span: BlockSpan, start: int, hidden: Any) -> Message:
    return Message(
        STEP,
        {"v": PROTOCOL_VERSION, "session": session_id, "span": span.to_wire(), "start": start},
        (hidden,),
    )


def build_close(session_id: bytes) -> Message:
    return Message(CLOSE, {"v": PROTOCOL_VERSION, "session": session_id})


def build_info_ok(fields: dict[str, Any]) -> Message:
    """``fields``: model, span, hidden_size, dtype, max_length, cache_tokens, throughput,
    sessions (see ``infer-info-ok``)."""
    return Message(reply_type(INFO), {"v": PROTOCOL_VERSION, **fields})


def build_open_ok(session_id: bytes, max_length: int) -> Message:
    return Message(
        reply_type(OPEN), {"v": PROTOCOL_VERSION, "session": session_id, "max_length": max_length}
    )


def build_step_ok(position: int, hidden: Any) -> Message:
    return Message(reply_type(STEP), {"v": PROTOCOL_VERSION, "position": position}, (hidden,))


def build_close_ok() -> Message:
    return Message(reply_type(CLOSE), {"v": PROTOCOL_VERSION})


def parse_open(message: Message) -> OpenRequest:
    fields = message.fields
    max_length = _uint(fields, "max_length")
    if max_length < 1:
        raise BadRequest("max_length must be at least 1")
    return OpenRequest(_str(fields, "model"), BlockSpan.from_wire(fields.get("span")), max_length)


def parse_step(message: Message, hidden_size: int) -> StepRequest:
    fields = message.fields
    if len(message.tensors) != 1:
        raise BadRequest(f"infer.step carries one tensor, got {len(message.tensors)}")
    hidden = message.tensors[0]
    check_hidden(hidden, hidden_size)
    return StepRequest(
        parse_session_id(fields),
        BlockSpan.from_wire(fields.get("span")),
        _uint(fields, "start"),
        hidden,
    )


def parse_close(message: Message) -> bytes:
    return parse_session_id(message.fields)


def check_hidden(hidden: Any, hidden_size: int) -> None:
    """Hidden states must be ``[1, T, hidden_size]`` of a wire float dtype."""
    dtype = str(getattr(hidden, "dtype", None))
    if dtype not in WIRE_FLOAT_DTYPES:
        raise BadTensor(f"hidden states must be one of {WIRE_FLOAT_DTYPES}, got {dtype}")
    shape = tuple(getattr(hidden, "shape", ()))
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != hidden_size:
        raise BadTensor(f"hidden states must be [1, T, {hidden_size}], got {list(shape)}")


def parse_session_id(fields: dict) -> bytes:
    session_id = fields.get("session")
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
        raise BadRequest(f"session must be {SESSION_ID_BYTES} bytes")
    return session_id


def _uint(fields: dict, key: str) -> int:
    value = fields.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"field {key!r} must be a non-negative integer")
    return value


def _str(fields: dict, key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    return value
