"""``MeshProtocol``: one verified TLS connection carrying framed requests both ways.

The protocol frames and dispatches; the endpoint decides (handler lookup,
pool bookkeeping). Per connection it owns:

- peer verification: on ``handshakeCompleted`` it reads the peer's node id
  from its certificate and drops a peer whose id is not the pinned one,
  before any frame is read; with a ``peer_check`` (a private swarm's
  ``SwarmPolicy.check_peer``), a peer that fails it is told why in a
  connection-level error frame and the connection is closed, again before any
  of its frames is read;
- request ids: our requests are numbered from 1 and matched to responses;
  the peer's requests are answered with its own ids (the id spaces of the two
  directions never meet, so either side can be client and server);
- a timeout on every request (``clock.callLater``), and ``ConnectionClosed``
  for every pending request when the connection drops;
- flow control: it registers itself as the transport's push producer; while
  the transport is paused, outgoing frames wait in a queue of memoryviews
  over the callers' tensors (no copy), and at most ``send_slice_bytes`` are
  handed to TLS per turn; while too many handler calls are in flight, or
  more than ``max_queued_bytes`` wait for a peer that does not read them, it
  stops reading from the peer;
- bundles (``meshnode.wire.bundle``): small frames sent in one reactor turn
  leave together at its end (``clock.callLater(0)``) as one bundle frame,
  and a received bundle's frames are handled in order in one turn, as if
  each had come alone; a frame too big for a bundle goes alone, in order.
  A quiet connection (its last sending turn sent one frame) sends a turn's
  first frame at once, so a lone step pays no wait; once a turn has sent
  several, the next turns bundle from their first frame;
- error frames: a handler's ``MeshError`` goes out with its code, anything
  else as ``internal`` (and is logged); framing violations (oversized
  prefix, non-CBOR header) get an error frame and close the connection. A
  connection-level error frame from the peer followed by a close (a swarm
  refusing us) fails our pending requests with that error, not a bare
  ``ConnectionClosed``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshnode.errors import (
    ConnectionClosed,
    FrameTooLarge,
    MalformedFrame,
    MeshError,
    RemoteError,
    RequestTimeout,
    UnknownMessageType,
    WireError,
)
from meshnode.identity import NodeID
from meshnode.tls import check_pinned, peer_node_id
from meshnode.wire import bundle
from meshnode.wire.codec import encode_error, encode_message, message_of
from meshnode.wire.frames import FrameDecoder, RawFrame
from meshnode.wire.header import (
    CONNECTION_LEVEL_ID,
    ERROR,
    REQUEST,
    RESPONSE,
    Header,
    decode_cbor,
    envelope_of,
    parse_header,
)
from meshnode.wire.limits import WireLimits
from meshnode.wire.message import ConnectionStats, Handler, Message, PeerInfo

log = Logger()

HandlerLookup = Callable[[str], "Handler | None"]
#: ``(peer certificate, peer node id) -> None``, raising a ``MeshError`` to refuse the peer
PeerCheck = Callable[[Any, NodeID], None]

_SCRATCH_BYTES = 64 * 1024


@implementer(IHandshakeListener, IPushProducer)
class MeshProtocol(Protocol):
    """One connection to one peer node; see the module docstring."""

    def __init__(
        self,
        clock: Any,
        limits: WireLimits,
        lookup: HandlerLookup,
        expected_id: NodeID | None = None,
        peer_check: PeerCheck | None = None,
        bundling: bool = True,
    ) -> None:
        self.clock = clock
        # small frames of one turn leave together, as one bundle (False: each at once)
        self.bundling = bundling
        self._turn: list[list[memoryview | bytes]] = []  # frames waiting for the turn's end
        self._turn_call: IDelayedCall | None = None  # the turn's end, while a turn sends
        self._turn_frames = 0  # small frames sent in this turn so far
        self._bursting = False  # the last turn that sent sent several: bundle from the first
        self.peer_check = peer_check
        self.peer_certificate: Any = None
        self._peer_error: RemoteError | None = None
        self.limits = limits
        self._lookup = lookup
        self.expected_id = expected_id
        self.peer: PeerInfo | None = None
        self.stats = ConnectionStats()
        self.ready: Deferred[MeshProtocol] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.connected = False
        self._decoder = FrameDecoder(limits.max_header_bytes, limits.max_body_bytes)
        self._next_id = 1
        self._pending: dict[int, tuple[Deferred[Message], IDelayedCall]] = {}
        self._handling: set[Deferred[Any]] = set()
        self._queue: deque[memoryview | bytes] = deque()
        self._queued = 0  # bytes in _queue
        self._paused = False
        self._reading_paused = False
        self._refusing = False
        self._closing = False
        self._scratch: memoryview | None = None
        self._discarding = False
        self._fail_reason: MeshError | None = None
        self._handshake_timer: IDelayedCall | None = None

    # -- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.registerProducer(self, True)
        self._handshake_timer = self.clock.callLater(
            self.limits.connect_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self._fail_reason = RequestTimeout("TLS handshake did not complete in time")
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._cancel_handshake_timer()
        try:
            node_id = peer_node_id(self.transport)
            check_pinned(self.expected_id, node_id)
        except MeshError as exc:
            self._fail_reason = exc
            self.transport.abortConnection()
            return
        if self.peer_check is not None:
            certificate = self.transport.getHandle().get_peer_certificate(as_cryptography=True)
            try:
                self.peer_check(certificate, node_id)
            except MeshError as exc:
                self.refuse_peer(exc)
                return
            self.peer_certificate = certificate
        remote = self.transport.getPeer()
        self.bind_peer(PeerInfo(node_id, getattr(remote, "host", ""), getattr(remote, "port", 0)))

    def refuse_peer(self, exc: MeshError) -> None:
        """Tell the peer why in a connection-level error frame, then close; read nothing of it."""
        log.info("refusing peer: {error}", error=exc)
        self._fail_reason = exc
        self._refusing = True
        self._send(encode_error(CONNECTION_LEVEL_ID, "", exc.code, str(exc)))
        self.close()

    def bind_peer(self, peer: PeerInfo) -> None:
        """Start reading frames from ``peer`` (called once its node id is verified)."""
        self._cancel_handshake_timer()
        self.peer = peer
        self.ready.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected = False
        self._cancel_handshake_timer()
        self._end_turn()  # nothing more leaves
        self._queue.clear()
        if not self.ready.called:
            error = self._fail_reason or ConnectionClosed(
                f"connection lost before the peer was verified: {_reason_text(reason)}"
            )
            self.ready.errback(Failure(error))
        pending, self._pending = self._pending, {}
        for deferred, timer in pending.values():
            if timer.active():
                timer.cancel()
            error = self._peer_error or ConnectionClosed(
                f"connection lost: {_reason_text(reason)}")
            deferred.errback(Failure(error))
        for deferred in list(self._handling):
            deferred.cancel()
        self.closed.callback(None)

    @property
    def usable(self) -> bool:
        """Verified, connected and not closing: requests may be sent."""
        return self.connected and self.peer is not None and not self._closing

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def close(self) -> None:
        """Close gracefully: frames already queued are written first."""
        self._flush_turn()
        self._closing = True
        self._finish_close()

    def _finish_close(self) -> None:
        # TLS will not shut down while a producer is registered, so let go of it
        # once our own queue is empty.
        if self._closing and self.connected and not self._queue:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    # -- outgoing requests --------------------------------------------------

    def request(self, message: Message, timeout: float) -> Deferred[Message]:
        """Send ``message`` as a request; fires with the response or fails (see module doc)."""
        if not self.usable:
            return defer.fail(ConnectionClosed("connection is not open"))
        request_id = self._next_id
        self._next_id += 1
        try:
            parts = encode_message(REQUEST, request_id, message)
        except MeshError as exc:
            return defer.fail(exc)

        def forget(deferred: Deferred[Message]) -> None:
            entry = self._pending.pop(request_id, None)
            if entry is not None and entry[1].active():
                entry[1].cancel()

        deferred: Deferred[Message] = Deferred(forget)
        timer = self.clock.callLater(timeout, self._timed_out, request_id, message.type, timeout)
        self._pending[request_id] = (deferred, timer)
        self._send(parts)
        return deferred

    def _timed_out(self, request_id: int, type_: str, timeout: float) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            entry[0].errback(Failure(RequestTimeout(f"{type_}: no answer in {timeout:g}s")))

    def _settle(self, header: Header, outcome: Message | MeshError) -> None:
        entry = self._pending.pop(header.request_id, None)
        if entry is None:
            log.debug("answer to unknown or expired request {id}", id=header.request_id)
            return
        deferred, timer = entry
        if timer.active():
            timer.cancel()
        if isinstance(outcome, MeshError):
            deferred.errback(Failure(outcome))
        else:
            deferred.callback(outcome)

    # -- sending and flow control ------------------------------------------

    def _send(self, parts: list[memoryview | bytes]) -> None:
        if not self.connected or self._closing:
            return
        self.stats.frames_sent += 1
        if not (self.bundling and bundle.bundleable(parts)):
            self._flush_turn()  # what waits for the turn's end was sent first
            self._enqueue(parts)
            return
        self._turn_frames += 1
        if self._turn_call is None:
            self._turn_call = self.clock.callLater(0, self._flush_turn)
            if not self._bursting:  # a quiet connection: its turn's first frame goes at once
                self._enqueue(parts)
                return
        self._turn.append(parts)

    def _flush_turn(self) -> None:
        """The turn's waiting frames, in order: alone when one, else as bundles."""
        self._bursting = self._turn_frames > 1
        for group in bundle.groups(self._end_turn()):
            self._enqueue(group[0] if len(group) == 1 else bundle.encode_bundle(group))

    def _end_turn(self) -> list[list[memoryview | bytes]]:
        """The turn is over: its call cancelled, its waiting frames handed back."""
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        self._turn_call = None
        frames, self._turn, self._turn_frames = self._turn, [], 0
        return frames

    def _enqueue(self, parts: list[memoryview | bytes]) -> None:
        if not self.connected:
            return
        size = sum(len(part) for part in parts)
        self.stats.bytes_sent += size
        self._queue.extend(parts)
        self._queued += size
        self._pump()
        self._throttle_reading()

    def _pump(self) -> None:
        slice_bytes = self.limits.send_slice_bytes
        while self._queue and not self._paused and self.connected:
            batch: list[memoryview | bytes] = []
            size = 0
            while self._queue and size < slice_bytes:
                part = self._queue.popleft()
                room = slice_bytes - size
                if len(part) > room:
                    view = memoryview(part)
                    self._queue.appendleft(view[room:])
                    part = view[:room]
                batch.append(part)
                size += len(part)
            self._queued -= size
            self.transport.writeSequence(batch)
        self._finish_close()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()
        self._throttle_reading()

    def stopProducing(self) -> None:
        self._paused = True
        self._queue.clear()
        self._queued = 0

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the transport (views over callers' tensors, not copies)."""
        return self._queued

    # -- receiving -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None or self._refusing:
            return
        self.stats.bytes_received += len(data)
        self._consume(self._decoder.feed(data))

    def get_buffer(self, sizehint: int) -> memoryview:
        """Receive-in-place hook used by ``meshnode.tls.MeshTLSProtocol``."""
        if self.peer is None or self._refusing:
            # Bytes we will not read: decrypt them into a small reused buffer.
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_SCRATCH_BYTES))
            self._discarding = True
            return self._scratch[: min(sizehint, _SCRATCH_BYTES)]
        self._discarding = False
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._discarding:
            return
        self.stats.bytes_received += nbytes
        self._consume(self._decoder.buffer_updated(nbytes))

    def _consume(self, frames: Iterator[RawFrame]) -> None:
        try:
            for frame in frames:
                self.stats.frames_received += 1
                self._dispatch(frame)
                if self._refusing or not self.connected:
                    return
        except FrameTooLarge as exc:
            self._refuse(exc)

    def _refuse(self, exc: WireError) -> None:
        """A framing violation: the stream is out of step; say why, then close."""
        log.warn("closing connection to {peer}: {error}", peer=self.peer, error=exc)
        self._refusing = True
        self._send(encode_error(CONNECTION_LEVEL_ID, "", exc.code, str(exc)))
        self.close()

    def _dispatch(self, frame: RawFrame, bundled: bool = False) -> None:
        try:
            raw = decode_cbor(frame.header)
        except MalformedFrame as exc:
            self._refuse(exc)
            return
        if bundle.is_bundle(raw):
            self._unbundle(raw, frame, bundled)
            return
        try:
            request_id, kind = envelope_of(raw)
        except MalformedFrame as exc:
            self._send(encode_error(CONNECTION_LEVEL_ID, "", exc.code, str(exc)))
            return
        type_ = raw.get("type") if isinstance(raw.get("type"), str) else ""
        try:
            header = parse_header(raw, self.limits.max_tensors, self.limits.max_tensor_dims)
            message = message_of(header, frame)
        except MeshError as exc:
            self._bad_frame(request_id, kind, type_, exc)
            return
        if kind == REQUEST:
            self._handle_request(header, message)
        elif kind == RESPONSE:
            self._settle(header, message)
        elif header.request_id == CONNECTION_LEVEL_ID:
            log.warn("peer {peer} reports {code}: {message}", peer=self.peer,
                     code=header.fields["code"], message=header.fields["message"])
            self._peer_error = _remote_error(header.fields)
        else:
            self._settle(header, _remote_error(header.fields))

    def _unbundle(self, raw: dict, frame: RawFrame, bundled: bool) -> None:
        """A bundle's frames, each handled as if it had come alone, in order."""
        try:
            if bundled:
                raise MalformedFrame("a bundle inside a bundle")
            frames = bundle.frames_of(raw, frame.body)
        except MalformedFrame as exc:
            self._refuse(exc)
            return
        self.stats.frames_received += len(frames) - 1  # the bundle itself was counted
        for inner in frames:
            self._dispatch(inner, bundled=True)
            if self._refusing or not self.connected:
                return

    def _bad_frame(self, request_id: int, kind: str, type_: str, exc: MeshError) -> None:
        if kind == REQUEST:
            self._send(encode_error(request_id, type_, exc.code, str(exc)))
        elif kind == RESPONSE or request_id != CONNECTION_LEVEL_ID:
            # A malformed answer fails the request it answers; the stream is still in step.
            self._settle(Header(type_, request_id, ERROR), exc)
        else:
            log.warn("malformed connection-level error from {peer}: {e}", peer=self.peer, e=exc)

    # -- serving the peer's requests ----------------------------------------

    def _handle_request(self, header: Header, message: Message) -> None:
        handler = self._lookup(header.type)
        if handler is None:
            error = UnknownMessageType(f"no handler for message type {header.type!r}")
            self._send(encode_error(header.request_id, header.type, error.code, str(error)))
            return
        deferred = defer.maybeDeferred(handler, self.peer, message)
        self._handling.add(deferred)
        self._throttle_reading()
        deferred.addCallback(self._respond, header)
        deferred.addErrback(self._respond_error, header)
        deferred.addBoth(self._handled, deferred)

    def _respond(self, result: Any, header: Header) -> None:
        if not isinstance(result, Message):
            raise TypeError(f"handler for {header.type!r} returned {type(result).__name__}")
        try:
            parts = encode_message(RESPONSE, header.request_id, result)
        except MeshError as exc:
            return self._respond_error(Failure(exc), header)
        self._send(parts)

    def _respond_error(self, failure: Failure, header: Header) -> None:
        if failure.check(defer.CancelledError) and not self.connected:
            return
        retry_after = None
        if failure.check(MeshError):
            code, text = failure.value.code, str(failure.value)
            retry_after = getattr(failure.value, "retry_after", None)
        else:
            log.failure("handler for {type} failed", failure, type=header.type)
            code, text = "internal", f"internal error in {header.type}"
        self._send(encode_error(header.request_id, header.type, code, text, retry_after))

    def _handled(self, result: Any, deferred: Deferred[Any]) -> None:
        self._handling.discard(deferred)
        self._throttle_reading()
        if isinstance(result, Failure):
            log.failure("answering {peer}", result, peer=self.peer)

    def _throttle_reading(self) -> None:
        busy = (
            len(self._handling) >= self.limits.max_inflight_handlers
            or self._queued > self.limits.max_queued_bytes
        )
        if busy and not self._reading_paused and self.connected:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not busy and self._reading_paused and self.connected:
            self._reading_paused = False
            self.transport.resumeProducing()


def _remote_error(fields: dict[str, Any]) -> RemoteError:
    retry_after = fields.get("retry_after")
    if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
        retry_after = None
    return RemoteError(fields["code"], fields["message"], retry_after)


def _reason_text(reason: Failure | None) -> str:
    if reason is None:
        return "closed"
    return reason.getErrorMessage() or reason.type.__name__
