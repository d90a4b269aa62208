"""The frame layout and an incremental, pure decoder for it.

A frame is::

    u32 header_length | u32 body_length | header (CBOR) | body (raw tensor bytes)

both lengths big-endian. ``FrameDecoder.feed`` takes whatever chunks the
transport delivers and yields ``RawFrame``s. Lengths are checked against the
limits as soon as the 8-byte prefix is complete, before anything is
buffered (``FrameTooLarge``). The body is received straight into one
64-byte-aligned buffer allocated for that frame, so the bytes are copied
exactly once (chunk -> buffer) and never re-joined; each frame owns its
buffer, so tensors viewing it stay valid after the next frame arrives.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from meshnode.errors import FrameTooLarge
from meshnode.wire.limits import MAX_BODY_BYTES, MAX_HEADER_BYTES, PREFIX_BYTES
from meshnode.wire.tensors import aligned_empty

_PREFIX = struct.Struct(">II")
_EMPTY_BODY = aligned_empty(0)


@dataclass(frozen=True)
class RawFrame:
    """A frame as it came off the wire: header bytes and the aligned body buffer."""

    header: bytes
    body: np.ndarray  # uint8, 64-byte aligned, owned by this frame

    @property
    def wire_bytes(self) -> int:
        return PREFIX_BYTES + len(self.header) + len(self.body)


def encode_prefix(header_length: int, body_length: int) -> bytes:
    return _PREFIX.pack(header_length, body_length)


def frame_parts(
    header: bytes, body_parts: Sequence[memoryview | bytes], body_length: int
) -> list[memoryview | bytes]:
    """The parts of one frame, for ``transport.writeSequence``: nothing is joined."""
    return [encode_prefix(len(header), body_length), header, *body_parts]


class FrameDecoder:
    """Turns a byte stream into ``RawFrame``s; raises ``FrameTooLarge`` on an oversized prefix.

    After it raises, the stream is out of step: the decoder refuses further input.
    """

    def __init__(
        self, max_header_bytes: int = MAX_HEADER_BYTES, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._small = bytearray()  # prefix or header bytes gathered so far
        self._header: bytes | None = None
        self._header_length = -1
        self._body: np.ndarray | None = None
        self._body_view: memoryview | None = None
        self._body_filled = 0
        self._failed: FrameTooLarge | None = None
        self._stage = memoryview(bytearray(0))
        self._direct = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held so far."""
        return len(self._small) + self._body_filled

    def feed(self, data: bytes | memoryview) -> Iterator[RawFrame]:
        """Consume ``data``; yield every frame it completes, in order."""
        if self._failed is not None:
            raise self._failed
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._body_view is not None:
                pos = self._fill_body(view, pos)
            elif self._header_length < 0:
                pos = self._gather(view, pos, PREFIX_BYTES)
                if len(self._small) == PREFIX_BYTES:
                    self._start_frame()
            else:
                pos = self._gather(view, pos, self._header_length)
                if len(self._small) == self._header_length:
                    self._header = bytes(self._small)
                    self._small.clear()
                    self._body_view = memoryview(self._body)
            frame = self._complete()
            if frame is not None:
                yield frame

    def get_buffer(self, limit: int) -> memoryview:
        """Where the next received bytes should be written (at most ``limit`` of them).

        Inside a body this is the rest of the frame's own aligned buffer, so
        the bytes land in place. Otherwise it is a staging buffer exactly as
        long as the rest of the prefix or header: a reader that fills it
        whole (``meshnode._tls_private.read_records``) never pulls body
        bytes into it, so they are never copied twice.
        """
        if self._failed is None and self._body_view is not None:
            self._direct = True
            return self._body_view[self._body_filled : self._body_filled + limit]
        self._direct = False
        want = PREFIX_BYTES if self._header_length < 0 else self._header_length
        want = min(max(want - len(self._small), 1), limit)
        if len(self._stage) < want:
            self._stage = memoryview(bytearray(max(want, PREFIX_BYTES)))
        return self._stage[:want]

    def buffer_updated(self, nbytes: int) -> Iterator[RawFrame]:
        """``nbytes`` were written into the last ``get_buffer``; yield completed frames."""
        if self._direct:
            self._body_filled += nbytes
            frame = self._complete()
            if frame is not None:
                yield frame
        else:
            yield from self.feed(self._stage[:nbytes])

    def _gather(self, view: memoryview, pos: int, want: int) -> int:
        take = min(want - len(self._small), len(view) - pos)
        self._small += view[pos : pos + take]
        return pos + take

    def _fill_body(self, view: memoryview, pos: int) -> int:
        take = min(len(self._body_view) - self._body_filled, len(view) - pos)
        self._body_view[self._body_filled : self._body_filled + take] = view[pos : pos + take]
        self._body_filled += take
        return pos + take

    def _start_frame(self) -> None:
        header_length, body_length = _PREFIX.unpack(self._small)
        self._small.clear()
        if header_length > self.max_header_bytes or body_length > self.max_body_bytes:
            self._failed = FrameTooLarge(
                f"frame announces header {header_length} / body {body_length} bytes; "
                f"limits are {self.max_header_bytes} / {self.max_body_bytes}"
            )
            raise self._failed
        self._header_length = header_length
        self._body = aligned_empty(body_length) if body_length else _EMPTY_BODY
        if header_length == 0:
            self._header = b""
            self._body_view = memoryview(self._body)

    def _complete(self) -> RawFrame | None:
        if self._body_view is None or self._body_filled < len(self._body_view):
            return None
        frame = RawFrame(self._header, self._body)
        self._header, self._header_length = None, -1
        self._body, self._body_view, self._body_filled = None, None, 0
        return frame
