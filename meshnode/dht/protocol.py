"""The DHT's RPCs over the wire Endpoint: handlers ``rpc_*`` and outgoing ``call_*``.

Every request a node receives from a listening peer, and every answer from a
peer it dialled, counts as that peer being alive: it goes into the routing
table. A full bucket makes us ping its oldest contact; the newcomer only
replaces it if the ping fails (``routing``). A lost connection to a contact
makes us ping it too, so a node that left drops out of the table at once. A
peer that cannot be reached (timeout, refused or lost connection, wrong node
id) or that answers with garbage is dropped from the table. An error frame is
an answer: the peer is alive.

Records are validated on the way in (``rpc_store``: refused with
``InvalidRecord`` or ``StorageFull``, sent back as an error frame) and on the
way back from lookups (``call_find_value`` drops records that fail), and so is
the store's ``admit`` check of a private swarm (only members' records).

Every Deferred this module starts is kept until it fires and cancelled by
``stop``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode.dht import messages
from meshnode.dht.crawling import LookupStats, QueryAnswer
from meshnode.dht.node import Contact
from meshnode.dht.records import SignedRecord, validate_record
from meshnode.dht.routing import RoutingTable
from meshnode.dht.storage import RecordStore
from meshnode.errors import DHTError, InvalidRecord, NotAMember, RemoteError
from meshnode.identity import NodeID, PeerAddress
from meshnode.wire.message import Message, PeerInfo

REQUEST_TIMEOUT = 5.0
"""Seconds a DHT request may take before the peer counts as dead."""

log = Logger()
T = TypeVar("T")


class DHTProtocol:
    """Answers the ``dht.*`` requests of one node and makes its outgoing calls."""

    def __init__(
        self,
        endpoint,
        table: RoutingTable,
        storage: RecordStore,
        clock,
        request_timeout: float = REQUEST_TIMEOUT,
        announced: PeerAddress | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.announced = announced
        """Where peers reach us, when not where the endpoint listens (``--announce-address``)."""
        self.table = table
        self.storage = storage
        self.clock = clock
        self.request_timeout = request_timeout
        self.own_id: NodeID = endpoint.identity.node_id
        self._pending: set[Deferred] = set()
        self._pinging: set[NodeID] = set()
        self._stopped = False

    def register(self) -> None:
        """Install the ``rpc_*`` handlers on the endpoint."""
        for type_, handler in (
            (messages.PING, self.rpc_ping),
            (messages.FIND_NODE, self.rpc_find_node),
            (messages.FIND_VALUE, self.rpc_find_value),
            (messages.STORE, self.rpc_store),
        ):
            self.endpoint.add_handler(type_, handler)
        self.endpoint.on_disconnect(self._disconnected)

    @property
    def listen_port(self) -> int | None:
        """The port we announce in requests; ``None`` when our endpoint does not listen."""
        if self.announced is not None:
            return self.announced.port
        address = getattr(self.endpoint, "address", None)
        return None if address is None else address.port

    @property
    def listen_host(self) -> str | None:
        """The host we announce in requests (``None``: peers take the one they see)."""
        return None if self.announced is None else self.announced.host

    def stop(self) -> None:
        """Answer no more requests and cancel every call in flight."""
        self._stopped = True
        for d in list(self._pending):
            d.cancel()

    # --- handlers ----------------------------------------------------------

    def rpc_ping(self, peer: PeerInfo, message: Message) -> Message:
        self._welcome_sender(peer, message, messages.PING)
        return messages.pong(self.own_id)

    def rpc_find_node(self, peer: PeerInfo, message: Message) -> Message:
        fields = self._welcome_sender(peer, message, messages.FIND_NODE)
        target = messages.id_field(fields, "target")
        return messages.nodes(self.table.closest(target, exclude=[peer.node_id]))

    def rpc_find_value(self, peer: PeerInfo, message: Message) -> Message:
        fields = self._welcome_sender(peer, message, messages.FIND_VALUE)
        key = messages.id_field(fields, "key")
        records = list(self.storage.get(key).values())
        return messages.value(records, self.table.closest(key, exclude=[peer.node_id]))

    def rpc_store(self, peer: PeerInfo, message: Message) -> Message:
        fields = self._welcome_sender(peer, message, messages.STORE)
        record = messages.record_field(fields)
        return messages.stored(self.storage.put(record))

    def _welcome_sender(self, peer: PeerInfo, message: Message, type_: str) -> dict:
        if self._stopped:
            raise DHTError("this DHT node has stopped")
        fields = messages.expect(message, type_)
        contact = messages.sender_contact(peer, message)
        if contact is not None:
            self.welcome(contact)
        return fields

    # --- calls -------------------------------------------------------------

    def call_ping(self, address: PeerAddress) -> Deferred[NodeID]:
        """Ping ``address``; fires with the node id the peer claims.

        The claim is proven only when ``address`` pins a node id (TLS checks it);
        an unpinned ping is the first step of a bootstrap, never a table entry.
        """
        contact = None
        if address.node_id is not None:
            contact = Contact(address.node_id, address.host, address.port)
        request = messages.ping(self.listen_port, self.listen_host)
        return self._request(address, contact, request, _parse_pong, None)

    def call_find_node(
        self, contact: Contact, target: bytes, stats: LookupStats | None = None
    ) -> Deferred[QueryAnswer]:
        request = messages.find_node(self.listen_port, target, self.listen_host)
        return self._request(contact.address, contact, request, _parse_nodes, stats)

    def call_find_value(
        self, contact: Contact, key: bytes, stats: LookupStats | None = None
    ) -> Deferred[QueryAnswer]:
        request = messages.find_value(self.listen_port, key, self.listen_host)
        parse = functools.partial(self._parse_value, contact=contact, key=key)
        return self._request(contact.address, contact, request, parse, stats)

    def call_store(
        self, contact: Contact, record: SignedRecord, stats: LookupStats | None = None
    ) -> Deferred[bool]:
        """Ask ``contact`` to hold ``record``; fires with whether it kept it as new."""
        request = messages.store(self.listen_port, record, self.listen_host)
        return self._request(contact.address, contact, request, _parse_stored, stats)

    def _parse_value(self, answer: Message, contact: Contact, key: bytes) -> QueryAnswer:
        fields = messages.expect(answer, messages.VALUE)
        now = self.clock.seconds()
        records = []
        for record in messages.records_field(fields):
            try:
                if record.key != key:
                    raise InvalidRecord("record for another key")
                validate_record(record, now, self.storage.max_ttl, self.storage.max_value_bytes)
                if self.storage.admit is not None:
                    self.storage.admit(record)
            except (InvalidRecord, NotAMember) as exc:
                # twisted.logger.Logger spells it warn
                log.warn("dropping a record from {peer}: {why}", peer=contact, why=exc)
                continue
            records.append(record)
        return QueryAnswer(messages.contacts_field(fields), records)

    # --- liveness ----------------------------------------------------------

    def welcome(self, contact: Contact) -> None:
        """Note that ``contact`` is alive; ping the oldest of its bucket when full."""
        oldest = self.table.add(contact, self.clock.seconds())
        if oldest is not None:
            self._probe(oldest)

    def _disconnected(self, node_id: NodeID) -> None:
        """A connection to a contact dropped: find out now whether it is still alive,
        rather than letting lookups trip over it."""
        contact = self.table.get(node_id)
        if contact is not None:
            self._probe(contact)

    def _probe(self, contact: Contact) -> None:
        if contact.node_id in self._pinging or self._stopped:
            return
        self._pinging.add(contact.node_id)
        d = self.call_ping(contact.address)
        # call_ping has already updated the table: kept on answer, removed on failure.
        d.addErrback(lambda _: None)
        d.addBoth(lambda _: self._pinging.discard(contact.node_id))

    def _request(
        self,
        address: PeerAddress,
        contact: Contact | None,
        message: Message,
        parse: Callable[[Message], T],
        stats: LookupStats | None,
    ) -> Deferred[T]:
        """Send ``message``; parse the answer; keep the table in step with the outcome."""
        if self._stopped:
            return fail(DHTError("this DHT node has stopped"))
        d = self.endpoint.request(address, message, self.request_timeout)
        self._pending.add(d)
        d.addBoth(self._settled, d)
        if stats is not None:
            stats.bytes_sent += messages.frame_bytes(message)
            d.addCallback(_count_received, stats)
        d.addCallback(parse)
        d.addCallbacks(self._answered, self._unanswered, (contact,), None, (contact,))
        return d

    def _settled(self, result: object, d: Deferred) -> object:
        self._pending.discard(d)
        return result

    def _answered(self, parsed: T, contact: Contact | None) -> T:
        if contact is not None:
            self.welcome(contact)
        return parsed

    def _unanswered(self, failure: Failure, contact: Contact | None) -> Failure:
        if contact is not None and not failure.check(RemoteError, CancelledError):
            self.table.remove(contact.node_id)
        return failure


def _count_received(answer: Message, stats: LookupStats) -> Message:
    stats.bytes_received += messages.frame_bytes(answer)
    return answer


def _parse_pong(answer: Message) -> NodeID:
    return messages.id_field(messages.expect(answer, messages.PONG), "id")


def _parse_nodes(answer: Message) -> QueryAnswer:
    return QueryAnswer(messages.contacts_field(messages.expect(answer, messages.NODES)))


def _parse_stored(answer: Message) -> bool:
    return messages.expect(answer, messages.STORED).get("stored") is True
