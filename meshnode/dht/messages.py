"""The ``dht.*`` messages: building them and parsing what peers send.

``schemas/dht.cddl`` is the definition; this module follows it. Parsing is
strict about what it uses and ignores unknown keys. A malformed request raises
``BadRequest`` (the wire turns it into an error frame); a malformed response
raises ``BadRequest`` too, and the caller treats that peer as failed.

A request carries the sender's listening ``port`` (``None`` for a node that
does not listen, such as a client), and the ``host`` it announces when it
was given one (``--announce-address``: behind NAT, a relay or a container,
the host its connections come from is not where peers reach it). Its node id
is never read from the message: the receiver takes it, and the host when the
message names none, from the TLS-verified ``PeerInfo``. An announced host is
taken on the sender's word: it is pinned to the sender's verified id, so a
false one only makes the sender itself unreachable. Contacts inside responses
are hearsay: a lookup dials them pinned to the announced id, so a false one
only costs a failed dial.
"""

from __future__ import annotations

from typing import Any

import cbor2

from meshnode.dht.node import Contact
from meshnode.dht.records import SignedRecord
from meshnode.errors import BadRequest, InvalidRecord
from meshnode.identity import MAX_PORT, NODE_ID_BYTES, NodeID
from meshnode.wire.codec import encode_message
from meshnode.wire.header import REQUEST
from meshnode.wire.message import Message, PeerInfo

VERSION = 1
PING, PONG = "dht.ping", "dht.pong"
FIND_NODE, NODES = "dht.find_node", "dht.nodes"
FIND_VALUE, VALUE = "dht.find_value", "dht.value"
STORE, STORED = "dht.store", "dht.stored"

MAX_CONTACTS_PER_RESPONSE = 32
"""Contacts a response may carry; more is a misbehaving peer."""

MAX_HOST_LENGTH = 253
"""Characters of an announced host (the longest DNS name)."""

MAX_RESPONSE_RECORD_BYTES = 48 * 1024
"""Record bytes in one FIND_VALUE answer, to stay under the wire's header limit."""


# --- building ----------------------------------------------------------------


def ping(port: int | None, host: str | None = None) -> Message:
    return Message(PING, {"v": VERSION, **_sender(port, host)})


def pong(node_id: NodeID) -> Message:
    return Message(PONG, {"v": VERSION, "id": node_id})


def find_node(port: int | None, target: bytes, host: str | None = None) -> Message:
    return Message(FIND_NODE, {"v": VERSION, **_sender(port, host), "target": target})


def nodes(contacts: list[Contact]) -> Message:
    return Message(NODES, {"v": VERSION, "nodes": [contact_to_wire(c) for c in contacts]})


def find_value(port: int | None, key: bytes, host: str | None = None) -> Message:
    return Message(FIND_VALUE, {"v": VERSION, **_sender(port, host), "key": key})


def value(records: list[SignedRecord], contacts: list[Contact]) -> Message:
    """A FIND_VALUE answer: the latest-expiring records that fit, and closer contacts."""
    return Message(
        VALUE,
        {
            "v": VERSION,
            "records": _records_within_budget(records),
            "nodes": [contact_to_wire(c) for c in contacts],
        },
    )


def store(port: int | None, record: SignedRecord, host: str | None = None) -> Message:
    return Message(STORE, {"v": VERSION, **_sender(port, host), "record": record.to_wire()})


def stored(kept: bool) -> Message:
    return Message(STORED, {"v": VERSION, "stored": kept})


def _sender(port: int | None, host: str | None) -> dict[str, Any]:
    return {"port": port} if host is None else {"port": port, "host": host}


def contact_to_wire(contact: Contact) -> dict[str, Any]:
    return {"id": contact.node_id, "host": contact.host, "port": contact.port}


def frame_bytes(message: Message) -> int:
    """Bytes of ``message`` framed by the wire (prefix + CBOR header), before TLS."""
    return sum(len(part) for part in encode_message(REQUEST, 1, message))


def _records_within_budget(records: list[SignedRecord]) -> list[dict[str, Any]]:
    chosen, budget = [], MAX_RESPONSE_RECORD_BYTES
    for record in sorted(records, key=lambda r: r.expiration, reverse=True):
        wire = record.to_wire()
        size = len(cbor2.dumps(wire))
        if size > budget:
            break
        chosen.append(wire)
        budget -= size
    return chosen


# --- parsing -----------------------------------------------------------------


def expect(message: Message, type_: str) -> dict[str, Any]:
    """The fields of ``message``; ``BadRequest`` unless it has type ``type_``."""
    if message.type != type_:
        raise BadRequest(f"expected {type_}, got {message.type!r}")
    return message.fields


def sender_contact(peer: PeerInfo, message: Message) -> Contact | None:
    """Who sent a request, as a contact: id from TLS, port from the message, host from the
    message when it announces one (else from TLS)."""
    port = message.fields.get("port")
    if port is None:
        return None
    if not _is_port(port):
        raise BadRequest(f"port must be a TCP port or null, not {port!r}")
    host = message.fields.get("host", peer.host)
    if not isinstance(host, str) or not host or len(host) > MAX_HOST_LENGTH:
        raise BadRequest(f"host must be a non-empty string of at most {MAX_HOST_LENGTH}")
    return Contact(peer.node_id, host, port)


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PORT


def id_field(fields: dict[str, Any], name: str) -> bytes:
    value = fields.get(name)
    if not isinstance(value, bytes) or len(value) != NODE_ID_BYTES:
        raise BadRequest(f"{name} must be {NODE_ID_BYTES} bytes")
    return value


def contacts_field(fields: dict[str, Any]) -> list[Contact]:
    """The ``nodes`` of a response; ``BadRequest`` on anything malformed."""
    items = fields.get("nodes")
    if not isinstance(items, list) or len(items) > MAX_CONTACTS_PER_RESPONSE:
        raise BadRequest(f"nodes must be a list of at most {MAX_CONTACTS_PER_RESPONSE}")
    contacts = []
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest("a contact must be a map")
        host, port = item.get("host"), item.get("port")
        if not isinstance(host, str) or not host:
            raise BadRequest("contact host must be a non-empty string")
        if not _is_port(port):
            raise BadRequest("contact port must be a TCP port")
        contacts.append(Contact(id_field(item, "id"), host, port))
    return contacts


def records_field(fields: dict[str, Any]) -> list[SignedRecord]:
    """The ``records`` of a FIND_VALUE answer, parsed (not yet validated)."""
    items = fields.get("records")
    if not isinstance(items, list):
        raise BadRequest("records must be a list")
    records = []
    for item in items:
        try:
            records.append(SignedRecord.from_wire(item))
        except InvalidRecord:
            continue  # dropped like a record whose signature fails
    return records


def record_field(fields: dict[str, Any]) -> SignedRecord:
    """The ``record`` of a STORE request; ``InvalidRecord`` when malformed."""
    return SignedRecord.from_wire(fields.get("record"))
