"""The delaying TCP relay of the WAN tests and benchmark, in memory: bytes arrive in order,
``delay`` seconds late each way, once the target is known; connections are counted."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from meshnode.testing.relay import DelayingRelay, target_from_file

DELAY = 0.02


def relay_with(target=lambda: ("127.0.0.1", 9000)):
    reactor = MemoryReactorClock()
    changes = []
    relay = DelayingRelay(reactor, target, DELAY, on_change=lambda s: changes.append(s.open))
    return reactor, relay, changes


def accept(reactor, relay):
    """A caller connects; returns its transport and its relay-side protocol."""
    caller = relay.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    caller.makeConnection(transport)
    return caller, transport


def connect_target(reactor, index=0):
    """The relay's dial to the target succeeds; returns the target's transport."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    side = factory.buildProtocol(None)
    transport = StringTransport()
    side.makeConnection(transport)
    return side, transport


def test_bytes_cross_each_way_after_the_delay_in_order():
    """When a caller and the target write, then each side receives the other's bytes, in
    order, only once the delay has passed."""
    reactor, relay, _ = relay_with()
    caller, caller_transport = accept(reactor, relay)
    target, target_transport = connect_target(reactor)
    assert reactor.tcpClients[0][:2] == ("127.0.0.1", 9000)
    caller.dataReceived(b"he")
    reactor.advance(DELAY / 2)
    caller.dataReceived(b"llo")
    assert target_transport.value() == b""
    reactor.advance(DELAY / 2)
    assert target_transport.value() == b"he"
    reactor.advance(DELAY / 2)
    assert target_transport.value() == b"hello"
    target.dataReceived(b"world")
    reactor.advance(DELAY * 0.9)
    assert caller_transport.value() == b""
    reactor.advance(DELAY * 0.1)
    assert caller_transport.value() == b"world"
    assert (relay.stats.bytes_to_target, relay.stats.bytes_from_target) == (5, 5)


def test_a_connection_waits_for_the_target_to_be_known():
    """When the target is not known yet, then the relay dials nobody and keeps what the caller
    sent; once it is known, it dials it and delivers that."""
    known = []
    reactor, relay, _ = relay_with(lambda: known[0] if known else None)
    caller, _ = accept(reactor, relay)
    caller.dataReceived(b"early")
    reactor.advance(1.0)
    assert reactor.tcpClients == []
    known.append(("127.0.0.1", 9001))
    reactor.advance(0.05)
    _, target_transport = connect_target(reactor)
    reactor.advance(DELAY)
    assert target_transport.value() == b"early"


def test_closing_one_side_closes_the_other_after_its_bytes():
    """When the target closes, then the caller still gets the bytes sent before, then its
    connection is closed; connections are counted as they open and close."""
    reactor, relay, changes = relay_with()
    caller, caller_transport = accept(reactor, relay)
    target, _ = connect_target(reactor)
    target.dataReceived(b"last words")
    target.connectionLost(None)
    assert not caller_transport.disconnecting
    reactor.advance(DELAY)
    assert caller_transport.value() == b"last words"
    assert caller_transport.disconnecting
    caller.connectionLost(None)
    assert changes == [1, 0]
    assert relay.stats.connections == 1


def test_target_read_from_a_file_once_it_exists(tmp_path: Path):
    """When the target file does not exist yet, then the target is unknown; once a node writes
    its listening address there, then the relay reads host and port from it."""
    path = tmp_path / "listening"
    read = target_from_file(path)
    assert read() is None
    path.write_text("127.0.0.1:4321\n")
    assert read() == ("127.0.0.1", 4321)


def test_a_shorter_delay_never_lets_bytes_overtake():
    """When the delay drops while bytes are in flight, then later bytes still arrive after
    earlier ones, and new bytes take the new delay once the queue has drained."""
    reactor, relay, _ = relay_with()
    caller, _ = accept(reactor, relay)
    _, target_transport = connect_target(reactor)
    caller.dataReceived(b"slow ")
    relay.set_delay(0.0)
    caller.dataReceived(b"fast")
    assert target_transport.value() == b""
    reactor.advance(DELAY)
    assert target_transport.value() == b"slow fast"
    caller.dataReceived(b"!")
    assert target_transport.value() == b"slow fast!"
    assert relay.stats.delay_ms == 0.0
