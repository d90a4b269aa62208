"""The frame decoder: any chunking of the stream yields the same frames; limits before buffering."""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.errors import FrameTooLarge
from meshnode.wire.frames import FrameDecoder, encode_prefix, frame_parts
from tests.wire.wire_helpers import raw_frame

FRAMES = [
    raw_frame({"n": 1}, b""),
    raw_frame({"n": 2}, bytes(range(200))),
    raw_frame(None, b"", encoded=b""),
    raw_frame({"n": 3}, b"\x07" * 1000),
]
STREAM = b"".join(FRAMES)


def decoded(chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    decoder = FrameDecoder()
    return [
        (frame.header, frame.body.tobytes()) for chunk in chunks for frame in decoder.feed(chunk)
    ]


EXPECTED = decoded([STREAM])


def test_whole_stream_in_one_chunk_gives_every_frame():
    """When several frames arrive in one chunk, then each is yielded, in order."""
    assert len(EXPECTED) == 4
    assert EXPECTED[1] == (FRAMES[1][8:-200], bytes(range(200)))
    assert EXPECTED[2] == (b"", b"")


def test_one_byte_at_a_time():
    """When the stream arrives one byte per chunk, then the frames are the same."""
    assert decoded([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_split_at_every_boundary():
    """When the stream is cut in two at any offset, then the frames are the same."""
    for cut in range(len(STREAM) + 1):
        assert decoded([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_body_lands_in_one_aligned_buffer_per_frame():
    """When bodies arrive in pieces, then each frame's body is its own 64-byte-aligned buffer."""
    decoder = FrameDecoder()
    frames = [f for i in range(0, len(STREAM), 7) for f in decoder.feed(STREAM[i : i + 7])]
    bodies = [frame.body for frame in frames if len(frame.body)]
    assert all(body.ctypes.data % 64 == 0 for body in bodies)
    assert not np.shares_memory(bodies[0], bodies[1])
    assert bodies[0].flags.writeable


def test_oversized_body_refused_on_the_prefix():
    """When a prefix announces a body over the limit, then FrameTooLarge before any body byte."""
    decoder = FrameDecoder(max_header_bytes=100, max_body_bytes=1000)
    with pytest.raises(FrameTooLarge):
        list(decoder.feed(encode_prefix(10, 1001)))
    assert decoder.buffered == 0
    with pytest.raises(FrameTooLarge):
        list(decoder.feed(b"more"))


def test_oversized_header_refused_on_the_prefix():
    """When a prefix announces a header over the limit, then FrameTooLarge at once."""
    decoder = FrameDecoder(max_header_bytes=100, max_body_bytes=1000)
    with pytest.raises(FrameTooLarge):
        list(decoder.feed(encode_prefix(0xFFFFFFFF, 0)))


def test_frames_before_a_bad_prefix_are_still_delivered():
    """When good frames precede an oversized prefix in one chunk, then they come out first."""
    decoder = FrameDecoder(max_body_bytes=10_000)
    got = []
    with pytest.raises(FrameTooLarge):
        for frame in decoder.feed(FRAMES[0] + FRAMES[1] + encode_prefix(1, 10_001)):
            got.append(frame)
    assert len(got) == 2


def test_frame_parts_are_not_joined():
    """When a frame is encoded, then the body parts are the caller's own memoryviews."""
    tensor = np.arange(16, dtype=np.float32)
    view = memoryview(tensor.view(np.uint8))
    parts = frame_parts(b"\xa0", [view], view.nbytes)
    assert parts[2] is view
    assert parts[0] == encode_prefix(1, 64)


def decoded_in_place(stream: bytes, limit: int) -> tuple[list[tuple[bytes, bytes]], list[int]]:
    """Frames from a reader that fills each ``get_buffer`` whole (as TLS does); buffer sizes."""
    decoder = FrameDecoder()
    frames, sizes, pos = [], [], 0
    while pos < len(stream):
        buffer = decoder.get_buffer(limit)
        sizes.append(len(buffer))
        take = min(len(buffer), len(stream) - pos)
        buffer[:take] = stream[pos : pos + take]
        pos += take
        frames += [(f.header, f.body.tobytes()) for f in decoder.buffer_updated(take)]
    return frames, sizes


@pytest.mark.parametrize("limit", [1, 5, 64, 1 << 20])
def test_receive_in_place_gives_the_same_frames(limit):
    """When bytes are written into get_buffer's buffers, then the frames are those of feed."""
    frames, _ = decoded_in_place(STREAM, limit)
    assert frames == EXPECTED


def test_staging_buffer_is_exactly_the_rest_of_prefix_or_header():
    """When a reader fills each buffer whole, then no body byte passes through staging."""
    _, sizes = decoded_in_place(FRAMES[1], 1 << 20)
    header_length = len(FRAMES[1]) - 8 - 200
    assert sizes == [8, header_length, 200]


def test_body_is_received_into_the_frame_buffer():
    """When a body arrives through get_buffer, then it is written in the frame's own buffer."""
    decoder = FrameDecoder()
    for part in (FRAMES[1][:8], FRAMES[1][8:-200]):
        decoder.get_buffer(1 << 20)[: len(part)] = part
        assert list(decoder.buffer_updated(len(part))) == []
    body_buffer = decoder.get_buffer(1 << 20)
    body_buffer[:] = bytes(range(200))
    (frame,) = decoder.buffer_updated(200)
    assert np.shares_memory(frame.body, np.asarray(body_buffer))
    assert frame.body.ctypes.data % 64 == 0
