"""``Message`` <-> frame parts: the header says where each tensor lies in the raw body."""

from __future__ import annotations

from meshnode.wire.frames import RawFrame, frame_parts
from meshnode.wire.header import ERROR, Header, encode_header, error_header
from meshnode.wire.message import Message
from meshnode.wire.tensors import layout_tensors, views_over


def encode_message(kind: str, request_id: int, message: Message) -> list[memoryview | bytes]:
    """The frame parts of ``message``; tensor bytes stay where they are (memoryviews)."""
    descriptors, body_parts, body_length = layout_tensors(message.tensors)
    header = Header(message.type, request_id, kind, dict(message.fields), tuple(descriptors))
    return frame_parts(encode_header(header), body_parts, body_length)


def encode_error(
    request_id: int, type_: str, code: str, text: str, retry_after: float | None = None
) -> list[memoryview | bytes]:
    """The frame parts of an error frame ``{code, message}`` (and ``retry_after``, if given)."""
    header = error_header(request_id, type_, code, text)
    if retry_after is not None:
        header.fields["retry_after"] = float(retry_after)
    return frame_parts(encode_header(header), [], 0)


def message_of(header: Header, frame: RawFrame) -> Message:
    """The message a validated header describes; ``BadTensor`` if a tensor overruns the body."""
    return Message(header.type, header.fields, views_over(frame.body, header.tensors))


def is_error(header: Header) -> bool:
    return header.kind == ERROR
