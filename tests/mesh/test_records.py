"""The announced server info round-trips through its DHT record and refuses junk."""

from __future__ import annotations

import pytest

from meshnode.errors import BadRequest
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState


def make_info(**overrides) -> ServerInfo:
    fields = {
        "address": "127.0.0.1:4000#" + "ab" * 32,
        "span": BlockSpan(0, 10),
        "state": WorkerState.ONLINE,
        "throughput": 123.5,
        "cache_tokens": 4096,
        "dtype": "float32",
        "model": "fp-1",
    }
    fields.update(overrides)
    return ServerInfo(**fields)


def test_record_round_trip():
    """When a server info is encoded to a record and decoded, then it is unchanged."""
    info = make_info()
    assert ServerInfo.from_record(info.to_record()) == info


def test_integer_throughput_accepted():
    """When a record carries an integer throughput, then it decodes as a float."""
    record = make_info().to_record() | {"throughput": 7}
    assert ServerInfo.from_record(record).throughput == 7.0


@pytest.mark.parametrize(
    "change",
    [
        {"span": [3, 3]},
        {"span": [5, 2]},
        {"span": "0:10"},
        {"state": "sleeping"},
        {"cache_tokens": "many"},
        {"cache_tokens": True},
        {"address": None},
    ],
)
def test_bad_records_refused(change):
    """When a record has a bad field, then decoding raises BadRequest, not a crash."""
    with pytest.raises(BadRequest):
        ServerInfo.from_record(make_info().to_record() | change)


def test_missing_field_refused():
    """When a record lacks a field, then decoding raises BadRequest."""
    record = make_info().to_record()
    del record["model"]
    with pytest.raises(BadRequest):
        ServerInfo.from_record(record)


def test_span_parse_and_contains():
    """When a span is parsed from A:B, then it is end-exclusive and compares by containment."""
    span = BlockSpan.parse("10:20")
    assert (span.start, span.end, span.length) == (10, 20, 10)
    assert span.contains(BlockSpan(12, 20)) and not span.contains(BlockSpan(9, 12))
    assert str(span) == "10:20"
    with pytest.raises(BadRequest):
        BlockSpan.parse("10-20")


def test_max_length_round_trips_and_is_optional():
    """When a worker announces its max length, then the record carries it; when a record
    from before the field has none, then it still parses, with max_length None."""
    info = make_info(max_length=256)
    assert info.to_record()["max_length"] == 256
    assert ServerInfo.from_record(info.to_record()) == info
    old = make_info().to_record()
    assert "max_length" not in old
    assert ServerInfo.from_record(old).max_length is None


def test_max_length_of_the_wrong_type_is_refused():
    """When max_length is not an integer, then the record is refused."""
    with pytest.raises(BadRequest):
        ServerInfo.from_record({**make_info().to_record(), "max_length": "long"})


def test_links_and_batching_fields_round_trip():
    """When a worker announces peer round trips, its load and its batch curve, then a client
    decodes the same values, and finds a peer's round trip by its node id."""
    peer = bytes(range(32))
    info = make_info(
        peer_rtts=((peer[:8], 0.02),), batch_load=5, batch_throughput=((1, 50.0), (8, 240.0))
    )
    decoded = ServerInfo.from_record(info.to_record())
    assert decoded == info
    assert decoded.peer_rtt(peer) == pytest.approx(0.02)
    assert decoded.peer_rtt(bytes(32)) is None


def test_records_from_before_links_and_batching_parse():
    """When a record carries none of the link or batching fields (an older worker), then it
    parses with none measured, no load and no curve, and encodes without them."""
    record = make_info().to_record()
    assert not {"peer_rtt_ms", "load", "batch_throughput"} & set(record)
    info = ServerInfo.from_record(record)
    assert (info.peer_rtts, info.batch_load, info.batch_throughput) == ((), None, ())


@pytest.mark.parametrize(
    "change",
    [
        {"peer_rtt_ms": {b"short": 1.0}},
        {"peer_rtt_ms": {bytes(8): "fast"}},
        {"peer_rtt_ms": {bytes([i]) * 8: 1.0 for i in range(17)}},
        {"load": -2},
        {"batch_throughput": [[4, 10.0], [1, 5.0]]},
        {"batch_throughput": [[0, 10.0]]},
        {"batch_throughput": [[1, 0.0]]},
        {"batch_throughput": [[b, 1.0 * b] for b in range(1, 10)]},
    ],
)
def test_bad_links_or_batching_fields_refused(change):
    """When a link or batching field is malformed, out of order or over its bound, then the
    record is refused with BadRequest."""
    with pytest.raises(BadRequest):
        ServerInfo.from_record(make_info().to_record() | change)
