"""Header and tensor-descriptor validation: each defect has its own named error."""

from __future__ import annotations

import cbor2
import ml_dtypes
import numpy as np
import pytest

from meshnode.errors import BadRequest, BadTensor, MalformedFrame, UnknownDtype
from meshnode.wire.codec import encode_message, message_of
from meshnode.wire.frames import FrameDecoder
from meshnode.wire.header import decode_cbor, envelope_of, parse_header
from meshnode.wire.message import Message
from meshnode.wire.tensors import WIRE_DTYPES
from tests.wire.wire_helpers import raw_frame, request_header


def descriptor(**overrides: object) -> dict:
    base = {"dtype": "float32", "shape": [2, 3], "offset": 0, "nbytes": 24}
    base.update(overrides)
    return base


def test_non_cbor_header_is_malformed():
    """When the header bytes are not CBOR, then MalformedFrame."""
    with pytest.raises(MalformedFrame):
        decode_cbor(b"\xff\xff\x00")


def test_truncated_header_is_malformed():
    """When the CBOR header is cut short, then MalformedFrame."""
    with pytest.raises(MalformedFrame):
        decode_cbor(cbor2.dumps(request_header())[:-3])


def test_trailing_bytes_after_header_are_malformed():
    """When bytes follow the CBOR item inside the header, then MalformedFrame."""
    with pytest.raises(MalformedFrame):
        decode_cbor(cbor2.dumps(request_header()) + b"\x00")


def test_header_that_is_not_a_map_is_malformed():
    """When the header is a CBOR list, then MalformedFrame."""
    with pytest.raises(MalformedFrame):
        envelope_of(decode_cbor(cbor2.dumps([1, 2, 3])))


@pytest.mark.parametrize("bad_id", [-1, "1", 1.0, True, 2**64, None])
def test_bad_request_id_is_malformed(bad_id):
    """When the id is not an unsigned 64-bit integer, then MalformedFrame."""
    with pytest.raises(MalformedFrame):
        envelope_of(request_header(request_id=bad_id))


@pytest.mark.parametrize(
    "change", [{"v": 2}, {"type": 5}, {"fields": [1]}, {"kind": "error", "fields": {"code": 1}}]
)
def test_wrong_field_types_are_bad_requests(change):
    """When version, type, fields or error fields have the wrong type, then BadRequest."""
    with pytest.raises(BadRequest):
        parse_header(request_header(**change))


def test_unknown_keys_are_ignored():
    """When a header and a descriptor carry keys we do not know, then they are ignored."""
    header = parse_header(request_header(extra=1, tensors=[descriptor(future=True)]))
    assert header.tensors[0].shape == (2, 3)


def test_unknown_dtype():
    """When a descriptor names a dtype the wire does not carry, then UnknownDtype."""
    with pytest.raises(UnknownDtype):
        parse_header(request_header(tensors=[descriptor(dtype="complex64")]))


def test_descriptor_disagreeing_with_shape_times_itemsize():
    """When nbytes is not prod(shape) x itemsize, then BadTensor."""
    with pytest.raises(BadTensor):
        parse_header(request_header(tensors=[descriptor(nbytes=20)]))


@pytest.mark.parametrize(
    "change", [{"shape": [-1]}, {"shape": "2x3"}, {"offset": 3}, {"offset": -64}, {"nbytes": "24"}]
)
def test_malformed_descriptor_fields(change):
    """When shape, offset or nbytes are of the wrong form (or unaligned), then BadTensor."""
    with pytest.raises(BadTensor):
        parse_header(request_header(tensors=[descriptor(**change)]))


def test_descriptor_overrunning_the_body():
    """When a tensor runs past the end of the body, then BadTensor."""
    header = request_header(tensors=[descriptor(offset=64)])
    frame = next(FrameDecoder().feed(raw_frame(header, bytes(80))))
    with pytest.raises(BadTensor):
        message_of(parse_header(decode_cbor(frame.header)), frame)


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
def test_every_wire_dtype_round_trips(name):
    """When a tensor of any wire dtype is encoded and decoded, then values and shape survive."""
    dtype = WIRE_DTYPES[name]
    tensor = (np.arange(12) % 2).astype(dtype).reshape(3, 4)
    scalar = np.array(3, dtype=np.float32)
    parts = encode_message("request", 7, Message("t", {"a": [1, "x"]}, (scalar, tensor)))
    frame = next(FrameDecoder().feed(b"".join(bytes(p) for p in parts)))
    header = parse_header(decode_cbor(frame.header))
    message = message_of(header, frame)
    assert header.request_id == 7 and message.fields == {"a": [1, "x"]}
    assert message.tensors[0].shape == () and float(message.tensors[0]) == 3.0
    assert message.tensors[1].dtype == dtype
    np.testing.assert_array_equal(message.tensors[1], tensor)
    assert all(d.offset % 64 == 0 for d in header.tensors)


def test_unsendable_dtype_is_refused_at_encoding():
    """When a caller sends a complex tensor, then UnknownDtype before anything is written."""
    with pytest.raises(UnknownDtype):
        encode_message("request", 1, Message("t", {}, (np.zeros(2, np.complex64),)))


def test_bfloat16_is_a_wire_dtype():
    assert WIRE_DTYPES["bfloat16"] == np.dtype(ml_dtypes.bfloat16)
