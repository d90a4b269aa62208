"""What handlers and callers exchange: ``Message``, ``PeerInfo``, ``Handler``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from twisted.internet.defer import Deferred

from meshnode.identity import NodeID, format_node_id


@dataclass(frozen=True)
class Message:
    """A typed message: CBOR-able ``fields`` plus tensors sent raw in the frame body.

    ``tensors`` may hold numpy arrays or jax arrays; received tensors are
    numpy views over the frame's own 64-byte-aligned receive buffer, so a
    handler may keep them (``meshnode.wire.tensors.as_jax`` gives a zero-copy
    ``jax.Array``). A sent tensor must not be mutated until the request's
    Deferred fires (or the handler's response is sent): it is written in place.
    """

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: tuple = ()


@dataclass(frozen=True)
class PeerInfo:
    """The TLS-verified remote of a connection (host/port as seen on the socket)."""

    node_id: NodeID
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}#{format_node_id(self.node_id)[:12]}"


@dataclass
class ConnectionStats:
    """Application bytes (frame prefix + header + body) and frames, per connection."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0


Handler = Callable[[PeerInfo, Message], Union[Message, "Deferred[Message]"]]
"""Answers one request. Raise (or fail with) a ``MeshError`` to send its code."""
