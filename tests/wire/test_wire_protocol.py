"""MeshProtocol over an in-memory transport: dispatch, errors, timeouts, flow control."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from meshnode.errors import (
    BadRequest,
    BadTensor,
    ConnectionClosed,
    RemoteError,
    RequestTimeout,
)
from meshnode.wire.limits import WireLimits
from meshnode.wire.message import Message
from tests.wire.wire_helpers import MemoryConnection, raw_frame, request_header


def failure_of(deferred: Deferred) -> Failure:
    failures = []
    deferred.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    return failures[0]


def result_of(deferred: Deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def answer(connection: MemoryConnection, header: dict, body: bytes = b"") -> None:
    """The peer's frame comes in, and the turn that handled it ends."""
    connection.feed(raw_frame(header, body))
    connection.end_turn()


# -- bad input: each gets an error frame or a clean close ---------------------


def test_length_prefix_over_limit_closes_after_error_frame():
    """When a prefix announces more than the limit, then error frame, close, no buffering."""
    connection = MemoryConnection(limits=WireLimits(max_body_bytes=1024))
    connection.feed(struct.pack(">II", 10, 1025) + b"x" * 100)
    headers = connection.sent_headers()
    assert headers[0]["kind"] == "error" and headers[0]["id"] == 0
    assert headers[0]["fields"]["code"] == "frame_too_large"
    assert connection.closed
    assert connection.protocol._decoder.buffered == 0


def test_non_cbor_header_closes_after_error_frame():
    """When a header is not CBOR, then an error frame (malformed_frame) and close."""
    connection = MemoryConnection()
    connection.feed(raw_frame(None, encoded=b"\xff\xfe\xfd"))
    assert connection.sent_headers()[0]["fields"]["code"] == "malformed_frame"
    assert connection.closed


def test_truncated_header_closes_after_error_frame():
    """When the CBOR header is cut short inside its frame, then malformed_frame and close."""
    connection = MemoryConnection()
    connection.feed(raw_frame(None, encoded=b"\xa5\x61v\x01"))
    assert connection.sent_headers()[0]["fields"]["code"] == "malformed_frame"
    assert connection.closed


def test_header_not_a_map_gets_connection_level_error():
    """When a header is a CBOR list, then a connection-level error frame, and the stream goes on."""
    connection = MemoryConnection()
    answer(connection, [1, 2])
    answer(connection, request_header("echo", 5))
    first, second = connection.sent_headers()
    assert (first["id"], first["fields"]["code"]) == (0, "malformed_frame")
    assert (second["id"], second["kind"]) == (5, "response")
    assert not connection.closed


def test_unknown_message_type():
    """When a request names a type with no handler, then unknown_message for that id."""
    connection = MemoryConnection()
    answer(connection, request_header("nope", 3))
    header = connection.sent_headers()[0]
    code = header["fields"]["code"]
    assert (header["id"], header["type"], code) == (3, "nope", "unknown_message")


@pytest.mark.parametrize(
    ("descriptor", "body", "code"),
    [
        ({"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}, b"\0" * 8, "bad_tensor"),
        ({"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 12}, b"\0" * 16, "bad_tensor"),
        (
            {"dtype": "float128", "shape": [1], "offset": 0, "nbytes": 16},
            b"\0" * 16,
            "unknown_dtype",
        ),
    ],
    ids=["overruns-body", "disagrees-with-shape", "unknown-dtype"],
)
def test_bad_tensor_descriptors_get_error_frames(descriptor, body, code):
    """When a descriptor is wrong, then an error frame with its code, and the connection stays."""
    connection = MemoryConnection()
    answer(connection, request_header("echo", 9, tensors=[descriptor]), body)
    header = connection.sent_headers()[0]
    assert (header["id"], header["fields"]["code"]) == (9, code)
    assert not connection.closed


# -- handlers -----------------------------------------------------------------


def test_handler_mesh_error_keeps_its_code():
    """When a handler raises a MeshError, then the error frame carries its code and text."""

    def refuse(peer, message):
        raise BadRequest("no such thing")

    connection = MemoryConnection({"x": refuse})
    answer(connection, request_header("x", 2))
    fields = connection.sent_headers()[0]["fields"]
    assert fields == {"code": "bad_request", "message": "no such thing"}


def test_handler_crash_is_internal_and_logged():
    """When a handler raises anything else, then internal, no details sent, logged."""

    def crash(peer, message):
        raise ZeroDivisionError("secret")

    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        connection = MemoryConnection({"x": crash})
        answer(connection, request_header("x", 2))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    fields = connection.sent_headers()[0]["fields"]
    assert fields["code"] == "internal" and "secret" not in fields["message"]
    assert any(event.get("log_failure") and event["log_failure"].check(ZeroDivisionError)
               for event in logged)
    assert not connection.closed


def test_deferred_handler_answers_later():
    """When a handler returns a Deferred, then the response goes out when it fires."""
    pending = Deferred()
    connection = MemoryConnection({"slow": lambda peer, message: pending})
    answer(connection, request_header("slow", 4))
    assert connection.sent_headers() == []
    pending.callback(Message("slow", {"ok": True}))
    assert connection.sent_headers()[0]["fields"] == {"ok": True}


def test_too_many_handlers_in_flight_pause_reading():
    """When max_inflight_handlers are running, then reading pauses until one finishes."""
    pending = [Deferred(), Deferred()]
    connection = MemoryConnection(
        {"slow": lambda peer, message: pending.pop(0)}, WireLimits(max_inflight_handlers=2)
    )
    first = pending[0]
    answer(connection, request_header("slow", 1))
    answer(connection, request_header("slow", 2))
    assert connection.transport.producerState == "paused"
    first.callback(Message("slow"))
    assert connection.transport.producerState == "producing"


# -- our requests ---------------------------------------------------------------


def test_many_requests_in_flight_matched_by_id():
    """When several requests are in flight, then each response settles its own request."""
    connection = MemoryConnection()
    deferreds = [connection.protocol.request(Message("q", {"i": i}), 5.0) for i in range(3)]
    ids = [header["id"] for header in connection.sent_headers()]
    assert len(set(ids)) == 3
    for request_id, i in reversed(list(zip(ids, range(3)))):
        answer(connection, {"v": 1, "type": "q", "id": request_id, "kind": "response",
                            "fields": {"i": i}})
    assert [result_of(d).fields["i"] for d in deferreds] == [0, 1, 2]


def test_error_frame_becomes_remote_error():
    """When the peer answers with an error frame, then the request fails with RemoteError."""
    connection = MemoryConnection()
    deferred = connection.protocol.request(Message("q"), 5.0)
    request_id = connection.sent_headers()[0]["id"]
    answer(connection, {"v": 1, "type": "q", "id": request_id, "kind": "error",
                        "fields": {"code": "no_capacity", "message": "full"}})
    error = failure_of(deferred).value
    assert isinstance(error, RemoteError) and (error.code, error.message) == ("no_capacity", "full")


def test_malformed_response_fails_only_its_request():
    """When a response's tensors overrun its body, then that request fails with BadTensor."""
    connection = MemoryConnection()
    deferred = connection.protocol.request(Message("q"), 5.0)
    request_id = connection.sent_headers()[0]["id"]
    bad = {"dtype": "int8", "shape": [9], "offset": 0, "nbytes": 9}
    answer(connection, {"v": 1, "type": "q", "id": request_id, "kind": "response",
                        "tensors": [bad]}, b"\0" * 4)
    failure_of(deferred).trap(BadTensor)
    assert not connection.closed


def test_request_times_out_on_the_injected_clock():
    """When no answer comes within the timeout, then RequestTimeout; a late answer is ignored."""
    connection = MemoryConnection()
    deferred = connection.protocol.request(Message("q"), 2.0)
    request_id = connection.sent_headers()[0]["id"]
    connection.clock.advance(1.9)
    assert not deferred.called
    connection.clock.advance(0.2)
    failure_of(deferred).trap(RequestTimeout)
    answer(connection, {"v": 1, "type": "q", "id": request_id, "kind": "response"})
    assert connection.clock.getDelayedCalls() == []


def test_pending_requests_fail_when_the_connection_drops():
    """When the connection is lost, then every pending request fails with ConnectionClosed."""
    connection = MemoryConnection()
    deferreds = [connection.protocol.request(Message("q"), 5.0) for _ in range(2)]
    connection.protocol.connectionLost(Failure(ConnectionError("gone")))
    for deferred in deferreds:
        failure_of(deferred).trap(ConnectionClosed)
    assert connection.clock.getDelayedCalls() == []
    failure_of(connection.protocol.request(Message("q"), 5.0)).trap(ConnectionClosed)


def test_cancelled_request_stops_its_timer():
    """When the caller cancels a request, then its timer is cancelled too."""
    connection = MemoryConnection()
    connection.protocol.request(Message("q"), 5.0).addErrback(lambda f: None).cancel()
    connection.end_turn()  # the request itself had left
    assert connection.clock.getDelayedCalls() == []


# -- flow control ---------------------------------------------------------------


def test_paused_transport_queues_views_and_resume_flushes():
    """When the transport pauses us, then frames wait (as views) until it resumes."""
    connection = MemoryConnection(limits=WireLimits(send_slice_bytes=4096))
    tensor = np.ones(10_000, np.float32)
    connection.protocol.pauseProducing()
    connection.protocol.request(Message("big", {}, (tensor,)), 5.0)
    connection.end_turn()
    assert connection.transport.value() == b""
    queued = connection.protocol.queued_bytes
    assert queued > tensor.nbytes
    connection.protocol.resumeProducing()
    (_header, frame), = connection.sent_frames()
    np.testing.assert_array_equal(frame.body[:tensor.nbytes].view(np.float32), tensor)
    assert connection.protocol.stats.bytes_sent == queued


def test_a_peer_that_does_not_read_its_answers_stops_being_read():
    """When answers to a peer that does not read them pass max_queued_bytes, then we stop
    reading its requests; when it reads again (the transport resumes us), reading resumes
    and every answer goes out."""
    tensor = np.ones(4096, np.float32)  # 16 KiB per answer
    connection = MemoryConnection(
        {"big": lambda peer, message: Message("big", {}, (tensor,))},
        WireLimits(max_queued_bytes=40_000),
    )
    connection.protocol.pauseProducing()  # the transport is full: the peer is not reading
    answer(connection, request_header("big", 1))
    answer(connection, request_header("big", 2))
    assert connection.transport.producerState == "producing"
    answer(connection, request_header("big", 3))
    assert connection.transport.producerState == "paused"
    assert 40_000 < connection.protocol.queued_bytes < 3 * 17_000
    connection.protocol.resumeProducing()
    assert connection.transport.producerState == "producing"
    assert connection.protocol.queued_bytes == 0
    frames = connection.sent_frames()
    assert [header["id"] for header, _ in frames] == [1, 2, 3]
    for _, frame in frames:
        np.testing.assert_array_equal(frame.body[: tensor.nbytes].view(np.float32), tensor)


def test_pause_mid_frame_stops_after_one_slice():
    """When the transport asks to pause during a write, then no more slices are written."""
    connection = MemoryConnection(limits=WireLimits(send_slice_bytes=4096))
    writes = []

    def write_then_pause(parts):
        writes.append(sum(len(p) for p in parts))
        connection.protocol.pauseProducing()

    connection.transport.writeSequence = write_then_pause
    connection.protocol.request(Message("big", {}, (np.ones(10_000, np.float32),)), 5.0)
    connection.end_turn()
    assert writes == [4096]
    connection.protocol.resumeProducing()
    assert writes == [4096, 4096]


def test_byte_counters_count_both_directions():
    """When frames go both ways, then bytes_sent and bytes_received match the wire."""
    connection = MemoryConnection()
    frame = raw_frame(request_header("echo", 1))
    connection.feed(frame)
    connection.end_turn()
    sent = connection.transport.value()
    stats = connection.protocol.stats
    assert (stats.bytes_received, stats.frames_received) == (len(frame), 1)
    assert (stats.bytes_sent, stats.frames_sent) == (len(sent), 1)


def test_encoding_refusal_fails_the_request_not_the_connection():
    """When fields cannot be CBOR-encoded, then BadRequest for that call only."""
    connection = MemoryConnection()
    failure_of(connection.protocol.request(Message("q", {"x": object()}), 5.0)).trap(BadRequest)
    assert not connection.closed
