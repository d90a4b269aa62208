"""Helpers shared by the wire tests: raw frame builders and an in-memory connection."""

from __future__ import annotations

import struct

import cbor2
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from meshnode.identity import Identity
from meshnode.wire.bundle import frames_of, is_bundle
from meshnode.wire.frames import FrameDecoder, RawFrame
from meshnode.wire.header import decode_cbor
from meshnode.wire.limits import WireLimits
from meshnode.wire.message import Message, PeerInfo
from meshnode.wire.protocol import MeshProtocol


def raw_frame(header: object, body: bytes = b"", *, encoded: bytes | None = None) -> bytes:
    """A frame with ``header`` CBOR-encoded (or given as raw bytes) and ``body``."""
    head = encoded if encoded is not None else cbor2.dumps(header)
    return struct.pack(">II", len(head), len(body)) + head + body


def request_header(type_: str = "echo", request_id: int = 1, **extra: object) -> dict:
    header = {"v": 1, "type": type_, "id": request_id, "kind": "request", "fields": {}}
    header.update(extra)
    return header


def echo(peer: PeerInfo, message: Message) -> Message:
    return Message(message.type, dict(message.fields), message.tensors)


def unbundled(written: list[tuple[dict, RawFrame]]) -> list[tuple[dict, RawFrame]]:
    """Frames with their decoded headers, those a bundle carries each on its own."""
    frames = []
    for header, frame in written:
        if is_bundle(header):
            frames.extend((decode_cbor(inner.header), inner)
                          for inner in frames_of(header, frame.body))
        else:
            frames.append((header, frame))
    return frames


class MemoryConnection:
    """A ``MeshProtocol`` over a ``StringTransport`` with a verified fake peer and a fake clock."""

    def __init__(self, handlers: dict | None = None, limits: WireLimits = WireLimits()) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        handlers = {"echo": echo} if handlers is None else handlers
        self.protocol = MeshProtocol(self.clock, limits, handlers.get)
        self.protocol.makeConnection(self.transport)
        self.protocol.bind_peer(PeerInfo(Identity.ephemeral().node_id, "127.0.0.1", 1))
        self.decoder = FrameDecoder(1 << 20, 1 << 30)

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end_turn(self) -> None:
        """The reactor turn ends: frames waiting to leave in a bundle are written."""
        self.clock.advance(0)

    def written_frames(self) -> list[tuple[dict, RawFrame]]:
        """Frames on the wire so far (bundles as they are), with their decoded headers."""
        self.end_turn()
        data = self.transport.value()
        self.transport.clear()
        return [(decode_cbor(frame.header), frame) for frame in self.decoder.feed(data)]

    def sent_frames(self) -> list[tuple[dict, RawFrame]]:
        """Frames sent so far (and not yet read), those of bundles each on its own."""
        return unbundled(self.written_frames())

    def sent_headers(self) -> list[dict]:
        return [header for header, _ in self.sent_frames()]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected
