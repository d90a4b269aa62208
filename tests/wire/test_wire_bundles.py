"""Bundles: small frames sent to one peer in one reactor turn leave together as one frame,
and the peer handles each as if it had come alone, all in one turn."""

from __future__ import annotations

import cbor2
import numpy as np
import pytest

from meshnode.wire import bundle
from meshnode.wire.codec import encode_message
from meshnode.wire.message import Message
from tests.wire.wire_helpers import MemoryConnection, raw_frame, request_header, unbundled


def wire_bytes(connection: MemoryConnection) -> bytes:
    """What ``connection`` wrote once its turn ended."""
    connection.end_turn()
    data = connection.transport.value()
    connection.transport.clear()
    return data


def bursting(connection: MemoryConnection) -> MemoryConnection:
    """``connection`` after a turn that sent two frames (echo requests, left unanswered)."""
    for _ in range(2):
        connection.protocol.request(Message("echo"), 5.0)
    wire_bytes(connection)
    return connection


def test_a_quiet_connection_sends_a_turns_first_frame_at_once_and_bundles_the_rest():
    """When a connection whose last turn sent one frame sends three in a turn, then the
    first leaves at once (a lone step waits for nothing) and the other two in one bundle
    at the turn's end."""
    connection = MemoryConnection()
    for i in range(3):
        connection.protocol.request(Message("q", {"i": i}), 5.0)
    assert connection.transport.value() != b""  # the first, before the turn ends
    written = connection.written_frames()
    assert [h["kind"] for h, _ in written] == ["request", "bundle"]
    assert [h["fields"]["i"] for h, _ in unbundled(written)] == [
        0, 1, 2]


def test_after_a_busy_turn_the_next_turns_bundle_from_their_first_frame():
    """When a turn has sent several frames, then the next turn's frames all wait for its end
    and leave as one bundle; a turn of one frame then leaves it plain, and after that quiet
    turn a lone frame goes at once again."""
    connection = bursting(MemoryConnection())
    for i in range(3):
        connection.protocol.request(Message("q", {"i": i}), 5.0)
    assert connection.transport.value() == b""
    assert [h["kind"] for h, _ in connection.written_frames()] == ["bundle"]
    connection.protocol.request(Message("q"), 5.0)
    assert connection.transport.value() == b""
    assert [h["kind"] for h, _ in connection.written_frames()] == ["request"]
    connection.protocol.request(Message("q"), 5.0)
    assert connection.transport.value() != b""


def test_a_bundle_arrives_frame_by_frame_in_one_read_and_its_answers_bundle_too():
    """When a busy node sends three requests with tensors in one turn, then one bundle
    leaves; the peer handles all three within the one read that brings it, each tensor an
    aligned view of the received buffer; a busy peer's three answers leave as one bundle
    too, and each settles its own request."""
    seen = []

    def echo(peer, message):
        seen.append(message)
        return Message("echo", dict(message.fields), message.tensors)

    client = bursting(MemoryConnection())
    server = MemoryConnection({"echo": echo})
    server.feed(b"".join(bytes(p) for i in (1, 2) for p in encode_message(
        "request", 1000 + i, Message("echo"))))  # a busy turn for the server too
    wire_bytes(server)
    seen.clear()
    tensors = [np.full((1, 3, 8), i, np.float32) for i in range(3)]
    replies = [client.protocol.request(Message("echo", {"i": i}, (t,)), 5.0)
               for i, t in enumerate(tensors)]
    written = client.written_frames()
    assert [header["kind"] for header, _ in written] == ["bundle"]
    server.feed(b"".join(bytes(p) for p in encode_bundle_of(written)))
    assert [m.fields["i"] for m in seen] == [0, 1, 2]  # all in the one read
    for message, tensor in zip(seen, tensors):
        np.testing.assert_array_equal(message.tensors[0], tensor)
        assert message.tensors[0].ctypes.data % 64 == 0
    answers = wire_bytes(server)
    assert bundle.is_bundle(cbor2.loads(answers[8 : 8 + int.from_bytes(answers[:4], "big")]))
    received = client.protocol.stats.frames_received
    client.feed(answers)
    results = [[] for _ in replies]
    for deferred, out in zip(replies, results):
        deferred.addCallback(out.append)
    for i, (out, tensor) in enumerate(zip(results, tensors)):
        assert out[0].fields == {"i": i}
        np.testing.assert_array_equal(out[0].tensors[0], tensor)
    assert client.protocol.stats.frames_received == received + 3


def encode_bundle_of(written) -> list:
    """The bundle frame ``written_frames`` returned, as wire parts again."""
    ((header, frame),) = written
    return [len(frame.header).to_bytes(4, "big"), len(frame.body).to_bytes(4, "big"),
            frame.header, bytes(frame.body)]


def test_one_frame_alone_in_its_turn_goes_as_a_plain_frame():
    """When a turn sends a single frame, then it leaves as itself, not in a bundle."""
    connection = MemoryConnection()
    connection.protocol.request(Message("q", {"a": 1}), 5.0)
    ((header, _),) = connection.written_frames()
    assert header["kind"] == "request" and header["fields"] == {"a": 1}


def test_a_frame_too_big_for_a_bundle_goes_alone_and_order_is_kept():
    """When a turn sends small, big (over MAX_BUNDLED_BODY), small frames, then the first
    small one leaves before the big one, the big one alone, the last after it."""
    connection = MemoryConnection()
    big = np.zeros(bundle.MAX_BUNDLED_BODY // 4 + 1, np.float32)
    for message in (Message("q"), Message("q", {}, (big,)), Message("q")):
        connection.protocol.request(message, 5.0)
    headers = [header for header, _ in connection.written_frames()]
    assert [(h["kind"], h["id"]) for h in headers] == [("request", 1), ("request", 2),
                                                       ("request", 3)]


def test_a_long_turn_is_cut_into_bundles_of_at_most_max_frames():
    """When a busy turn sends more frames than a bundle holds, then several bundles leave,
    in order, none over MAX_BUNDLE_FRAMES."""
    connection = bursting(MemoryConnection())
    for i in range(bundle.MAX_BUNDLE_FRAMES + 3):
        connection.protocol.request(Message("q", {"i": i}), 5.0)
    written = connection.written_frames()
    sizes = [len(header["fields"]["frames"]) for header, _ in written]
    assert sizes == [bundle.MAX_BUNDLE_FRAMES, 3]
    ids = [header["id"] for header, _ in unbundled(written)]
    assert ids == list(range(3, bundle.MAX_BUNDLE_FRAMES + 6))


def test_bundles_stop_at_max_bundle_body_bytes():
    """When a busy turn sends more body bytes than a bundle holds, then the frames are cut
    into bundles of at most MAX_BUNDLE_BODY body bytes, in order."""
    connection = bursting(MemoryConnection())
    tensor = np.zeros(bundle.MAX_BUNDLED_BODY // 4, np.float32)  # the largest bundled body
    count = bundle.MAX_BUNDLE_BODY // tensor.nbytes + 2
    for i in range(count):
        connection.protocol.request(Message("q", {"i": i}, (tensor,)), 5.0)
    written = connection.written_frames()
    assert [len(h["fields"]["frames"]) for h, _ in written] == [count - 2, 2]
    assert all(len(frame.body) <= bundle.MAX_BUNDLE_BODY for _, frame in written)
    assert [h["fields"]["i"] for h, _ in unbundled(written)] == list(range(count))


def test_a_bad_request_in_a_bundle_gets_its_own_error_and_the_others_their_answers():
    """When a bundle carries an echo, a request of an unknown type and another echo, then
    the unknown one gets unknown_message, both echoes their answers, the connection stays."""
    connection = MemoryConnection()
    frames = [encode_message("request", i, Message(t, {"i": i}))
              for i, t in ((1, "echo"), (2, "nope"), (3, "echo"))]
    connection.feed(b"".join(bytes(p) for p in bundle.encode_bundle(frames)))
    answers = {h["id"]: h for h in connection.sent_headers()}
    assert answers[2]["kind"] == "error" and answers[2]["fields"]["code"] == "unknown_message"
    assert answers[1]["kind"] == answers[3]["kind"] == "response"
    assert not connection.closed


def test_close_sends_what_the_turn_holds_first():
    """When a node sends a frame and closes in the same turn, then the frame is written
    before the connection goes."""
    connection = MemoryConnection()
    connection.protocol.request(Message("q", {"last": True}), 5.0)
    connection.protocol.close()
    assert connection.closed
    ((header, _),) = connection.written_frames()
    assert header["fields"] == {"last": True}


def _bundle_header(frames) -> dict:
    return {"v": 1, "type": bundle.BUNDLE_TYPE, "id": 0, "kind": "bundle",
            "fields": {"frames": frames}}


_ECHO = cbor2.dumps(request_header("echo", 1))
_NESTED = cbor2.dumps(_bundle_header([[_ECHO, 0, 0]]))


@pytest.mark.parametrize(
    "frames, body",
    [
        ("not a list", b""),
        ([], b""),
        ([[_ECHO, 0]], b""),                         # an entry of two items
        ([[_ECHO, 8, 4]], bytes(64)),                # an unaligned body
        ([[_ECHO, 0, 65]], bytes(64)),               # a body past the bundle's
        ([[_ECHO, 0, 64], [_ECHO, 0, 64]], bytes(128)),  # overlapping bodies
        ([[_NESTED, 0, 0]], b""),                    # a bundle in a bundle
        ([[_ECHO, 0, 0]] * (bundle.MAX_BUNDLE_FRAMES + 1), b""),
    ],
    ids=["not-list", "empty", "short-entry", "unaligned", "overrun", "overlap", "nested",
         "too-many"],
)
def test_a_malformed_bundle_is_a_framing_violation(frames, body):
    """When a bundle's list of frames is malformed, then a connection-level malformed_frame
    error goes out, the connection closes, and none of its frames is handled."""
    seen = []
    connection = MemoryConnection({"echo": lambda peer, message: seen.append(message) or
                                   message})
    connection.feed(raw_frame(_bundle_header(frames), body))
    headers = connection.sent_headers()
    assert [(h["kind"], h["id"], h["fields"]["code"]) for h in headers] == [
        ("error", 0, "malformed_frame")]
    assert connection.closed
    assert seen == []
