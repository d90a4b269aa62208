"""The ``infer.*`` messages (``schemas/inference.cddl``): built by clients, parsed by workers.

Each ``build_*`` gives the ``Message`` a client sends; each ``parse_*`` checks
a received message's fields and raises ``BadRequest`` / ``BadTensor`` on junk,
so handlers see typed values. Replies are ``<type>.ok``.

Forwarding (``docs/mesh.md``): a step may carry the rest of its route
(``forward``: one ``ForwardHop`` per later hop); a worker pushes its output
into the next hop's session with ``infer.push`` (the hop's capability
attached); the client collects each later hop's output with ``infer.wait``.
A reply to a step or wait that was to be pushed on says how the push went
(``forward_error``, absent when it was accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meshnode.errors import BadAddress, BadRequest, BadTensor
from meshnode.identity import PeerAddress
from meshnode.inference.records import PROTOCOL_VERSION, SESSION_ID_BYTES, BlockSpan
from meshnode.wire.message import Message

INFO, OPEN, STEP, CLOSE = "infer.info", "infer.open", "infer.step", "infer.close"
PUSH, WAIT = "infer.push", "infer.wait"

#: bytes of a session's push key (``meshnode.inference.capabilities``)
PUSH_KEY_BYTES = 32
#: the most later hops one step may name (a route is a few hops; this bounds the header)
MAX_FORWARD_HOPS = 64

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
class ForwardHop:
    """A later hop of a forwarded step: where to push, into which session, with what right."""

    address: PeerAddress          # pinned: the pusher dials it with the node id checked
    session_id: bytes
    span: BlockSpan
    capability: dict              # ``meshnode.inference.capabilities``, checked by the hop

    def to_wire(self) -> dict[str, Any]:
        return {"address": str(self.address), "session": self.session_id,
                "span": self.span.to_wire(), "cap": self.capability}


@dataclass(frozen=True)
class StepRequest:
    session_id: bytes
    span: BlockSpan
    start: int
    hidden: np.ndarray
    forward: tuple[ForwardHop, ...] = ()


@dataclass(frozen=True)
class PushRequest:
    step: StepRequest             # session, span, start, hidden and the hops after this one
    capability: Any               # checked against the session's owner by the handler


@dataclass(frozen=True)
class WaitRequest:
    session_id: bytes
    start: int


def build_info() -> Message:
    return Message(INFO, {"v": PROTOCOL_VERSION})


def build_open(model: str, span: BlockSpan, max_length: int) -> Message:
    return Message(
        OPEN,
        {"v": PROTOCOL_VERSION, "model": model, "span": span.to_wire(), "max_length": max_length},
    )


def build_step(session_id: bytes, span: BlockSpan, start: int, hidden: Any,
               forward: tuple[ForwardHop, ...] = ()) -> Message:
    fields = {"v": PROTOCOL_VERSION, "session": session_id, "span": span.to_wire(),
              "start": start}
    if forward:
        fields["forward"] = [hop.to_wire() for hop in forward]
    return Message(STEP, fields, (hidden,))


def build_push(hop: ForwardHop, start: int, hidden: Any,
               forward: tuple[ForwardHop, ...] = ()) -> Message:
    """What a worker sends ``hop``: its output as the hop's input, and the hops after it."""
    fields = {"v": PROTOCOL_VERSION, "session": hop.session_id, "span": hop.span.to_wire(),
              "start": start, "cap": hop.capability}
    if forward:
        fields["forward"] = [later.to_wire() for later in forward]
    return Message(PUSH, fields, (hidden,))


def build_wait(session_id: bytes, start: int) -> Message:
    return Message(WAIT, {"v": PROTOCOL_VERSION, "session": session_id, "start": start})


def build_close(session_id: bytes) -> Message:
    return Message(CLOSE, {"v": PROTOCOL_VERSION, "session": session_id})


def build_info_ok(fields: dict[str, Any]) -> Message:
    """``fields``: model, span, hidden_size, dtype, max_length, cache_tokens, throughput,
    sessions (see ``infer-info-ok``)."""
    return Message(reply_type(INFO), {"v": PROTOCOL_VERSION, **fields})


def build_open_ok(session_id: bytes, max_length: int, push_key: bytes | None = None) -> Message:
    """``push_key``: what the owner issues this session's capabilities with (forwarding)."""
    fields = {"v": PROTOCOL_VERSION, "session": session_id, "max_length": max_length}
    if push_key is not None:
        fields["push_key"] = push_key
    return Message(reply_type(OPEN), fields)


def build_step_ok(position: int, hidden: Any, forward_error: dict | None = None) -> Message:
    return Message(reply_type(STEP), _output_fields(position, forward_error), (hidden,))


def build_push_ok(position: int) -> Message:
    """The push is accepted: ``position`` is where the session will be once it has run."""
    return Message(reply_type(PUSH), {"v": PROTOCOL_VERSION, "position": position})


def build_wait_ok(position: int, hidden: Any, forward_error: dict | None = None) -> Message:
    return Message(reply_type(WAIT), _output_fields(position, forward_error), (hidden,))


def forward_error(node_id: bytes, address: str, code: str, message: str) -> dict[str, Any]:
    """How a push to the next hop failed (``forward-error``): that hop and its error."""
    return {"node": node_id, "address": address, "code": code, "message": message}


def _output_fields(position: int, error: dict | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"v": PROTOCOL_VERSION, "position": position}
    if error is not None:
        fields["forward_error"] = error
    return fields


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
        parse_forward(fields.get("forward", [])),
    )


def parse_push(message: Message, hidden_size: int) -> PushRequest:
    step = parse_step(Message(STEP, message.fields, message.tensors), hidden_size)
    return PushRequest(step, message.fields.get("cap"))


def parse_wait(message: Message) -> WaitRequest:
    return WaitRequest(parse_session_id(message.fields), _uint(message.fields, "start"))


def parse_forward(value: Any) -> tuple[ForwardHop, ...]:
    """The ``forward`` list of a step or push: pinned addresses, sessions, spans."""
    if not isinstance(value, list) or len(value) > MAX_FORWARD_HOPS:
        raise BadRequest(f"forward must be a list of at most {MAX_FORWARD_HOPS} hops")
    hops = []
    for entry in value:
        if not isinstance(entry, dict):
            raise BadRequest("each forward hop must be a map")
        try:
            address = PeerAddress.parse(_str(entry, "address"))
        except BadAddress as exc:
            raise BadRequest(f"forward hop address: {exc}") from None
        if address.node_id is None:
            raise BadRequest("a forward hop's address must pin its node id")
        capability = entry.get("cap")
        if not isinstance(capability, dict):
            raise BadRequest("each forward hop carries a capability map")
        hops.append(ForwardHop(address, parse_session_id(entry),
                               BlockSpan.from_wire(entry.get("span")), capability))
    return tuple(hops)


def parse_output(message: Message, expected_shape: tuple[int, ...]) -> tuple[Any, dict | None]:
    """A step or wait reply's output tensor and its ``forward_error`` (None: none)."""
    if len(message.tensors) != 1 or tuple(message.tensors[0].shape) != tuple(expected_shape):
        raise BadRequest(f"{message.type} carries no output of shape {list(expected_shape)}")
    error = message.fields.get("forward_error")
    if error is not None and not (
        isinstance(error, dict) and isinstance(error.get("node"), bytes)
        and isinstance(error.get("address"), str) and isinstance(error.get("code"), str)
    ):
        raise BadRequest("forward_error must name the hop (node, address) and a code")
    return message.tensors[0], error


def parse_push_key(fields: dict) -> bytes | None:
    """An ``infer.open.ok``'s push key; None from a worker that does not forward."""
    key = fields.get("push_key")
    if key is None:
        return None
    if not isinstance(key, bytes) or len(key) != PUSH_KEY_BYTES:
        raise BadRequest(f"push_key must be {PUSH_KEY_BYTES} bytes")
    return key


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
