"""Bundles: the small frames written to one peer in one reactor turn go as one frame.

A bundle is a frame of kind ``"bundle"`` (``schemas/wire.cddl``,
``bundle-header``). Its header lists the frames it carries, each as its own
CBOR header bytes and the offset and length of its body inside the bundle's
body. Offsets are multiples of 64, so each frame's tensors stay aligned in
the one receive buffer and reach JAX without a copy.

The receiver handles the frames in order, as if each had come alone, and all
in the same reactor turn. A burst of steps from one client, or the pushes of
one iteration, therefore reaches the peer's handlers together, and its
scheduler puts them in one batch (``meshnode.worker.batching``). The burst
also costs one TLS write and one read, not one per frame.

What goes in: frames with a body of at most ``MAX_BUNDLED_BODY`` bytes. A
bundle holds at most ``MAX_BUNDLE_FRAMES`` frames, ``MAX_BUNDLE_HEADERS``
bytes of their headers and ``MAX_BUNDLE_BODY`` bytes of their bodies. A
bigger frame goes alone, in order with the others.

What is refused (``MalformedFrame``, a framing violation: the connection is
closed): a bundle whose list is not as above, whose frames overlap, run past
its body or sit at unaligned offsets, or that holds a bundle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import cbor2
import numpy as np

from meshnode.errors import MalformedFrame
from meshnode.wire.frames import RawFrame, frame_parts
from meshnode.wire.limits import PROTOCOL_VERSION, TENSOR_ALIGNMENT
from meshnode.wire.tensors import align_up

BUNDLE = "bundle"
BUNDLE_TYPE = "wire.bundle"
#: frames one bundle carries, at most
MAX_BUNDLE_FRAMES = 256
#: bytes of the carried frames' headers in one bundle, at most
MAX_BUNDLE_HEADERS = 32 * 1024
#: a frame whose body is longer goes alone
MAX_BUNDLED_BODY = 256 * 1024
#: bytes of the carried frames' bodies in one bundle, at most (padding aside)
MAX_BUNDLE_BODY = 4 * 1024 * 1024

Parts = list  # one frame's parts: [prefix, header, *body parts] (``frame_parts``)

_PADDING = memoryview(bytes(TENSOR_ALIGNMENT))


def bundleable(parts: Parts) -> bool:
    """Whether a frame (its parts) may travel in a bundle."""
    return len(parts[1]) <= MAX_BUNDLE_HEADERS and _body_length(parts) <= MAX_BUNDLED_BODY


def groups(frames: Sequence[Parts]) -> Iterator[list[Parts]]:
    """``frames`` in order, cut into groups that each fit one bundle."""
    group: list[Parts] = []
    header_bytes = body_bytes = 0
    for parts in frames:
        if group and (len(group) == MAX_BUNDLE_FRAMES
                      or header_bytes + len(parts[1]) > MAX_BUNDLE_HEADERS
                      or body_bytes + _body_length(parts) > MAX_BUNDLE_BODY):
            yield group
            group, header_bytes, body_bytes = [], 0, 0
        group.append(parts)
        header_bytes += len(parts[1])
        body_bytes += _body_length(parts)
    if group:
        yield group


def encode_bundle(frames: Sequence[Parts]) -> Parts:
    """The parts of one bundle frame carrying ``frames`` (each ``bundleable``)."""
    entries, body, offset = [], [], 0
    for parts in frames:
        padded = align_up(offset)
        if padded > offset:
            body.append(_PADDING[: padded - offset])
        length = _body_length(parts)
        entries.append([bytes(parts[1]), padded, length])
        body.extend(parts[2:])
        offset = padded + length
    header = cbor2.dumps({"v": PROTOCOL_VERSION, "type": BUNDLE_TYPE, "id": 0, "kind": BUNDLE,
                          "fields": {"frames": entries}}, canonical=True)
    return frame_parts(header, body, offset)


def is_bundle(raw: Any) -> bool:
    """Whether a decoded header is a bundle's."""
    return isinstance(raw, dict) and raw.get("kind") == BUNDLE


def frames_of(raw: dict, body: np.ndarray) -> list[RawFrame]:
    """The frames a bundle carries, each a ``RawFrame`` whose body views ``body``;
    ``MalformedFrame`` for any defect (see the module doc). Their headers need no check
    of their own: they are inside the bundle's, which the frame limits bounded."""
    fields = raw.get("fields")
    entries = fields.get("frames") if isinstance(fields, dict) else None
    if raw.get("v") != PROTOCOL_VERSION:
        raise MalformedFrame(f"unsupported protocol version {raw.get('v')!r} of a bundle")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_BUNDLE_FRAMES:
        raise MalformedFrame(f"a bundle carries 1 to {MAX_BUNDLE_FRAMES} frames")
    frames, end = [], 0
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], bytes)
                and _is_uint(entry[1]) and _is_uint(entry[2])):
            raise MalformedFrame("a bundled frame is [header bytes, offset, length]")
        header, offset, length = entry
        if offset % TENSOR_ALIGNMENT or offset < end or offset + length > len(body):
            raise MalformedFrame("a bundled frame's body is unaligned, overlaps another or "
                                 "runs past the bundle")
        end = offset + length
        frames.append(RawFrame(header, body[offset:end]))
    return frames


def _body_length(parts: Parts) -> int:
    return sum(len(part) for part in parts[2:])


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
