"""Golden encodings of schemas/dht.cddl, produced by the DHT's own message builders.

``tests/test_schemas.py`` checks that these bytes equal ``schemas/golden/dht/``
(see ``schemas/README.md``); ``MESHNODE_WRITE_GOLDEN=1`` rewrites the files.
"""

from __future__ import annotations

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.dht import messages
from meshnode.dht.node import BLOCK_KEY_DOMAIN, Contact, block_key
from meshnode.dht.records import sign_record, signing_payload
from meshnode.identity import Identity

# A fixed key: Ed25519 signatures are deterministic, so the golden bytes are too.
WRITER = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
KEY = block_key("smollm2-135m@0123abcd", 4)
EXPIRATION = 1_800_000_000.5
VALUE = {
    "v": 1,
    "address": "127.0.0.1:7001#" + WRITER.node_id.hex(),
    "span": [0, 10],
    "state": "online",
    "throughput": 25.0,
    "cache_tokens": 8192,
    "dtype": "float32",
    "model": "smollm2-135m@0123abcd",
}
CONTACTS = [Contact(bytes([i]) * 32, "127.0.0.1", 7000 + i) for i in range(1, 3)] + [
    Contact(bytes(32), "::1", 65535)
]


def _member_record():
    """A block record by a private swarm's member: its membership certificate rides along."""
    import dataclasses

    from tests.swarm.swarm_golden import member_certificate

    member = dataclasses.replace(WRITER, membership=member_certificate().encode())
    return sign_record(member, KEY, VALUE, EXPIRATION)


def _fields(message) -> bytes:
    return cbor2.dumps(message.fields, canonical=True)


def golden_examples() -> dict[str, bytes]:
    """``"<rule>.<example>"`` -> the exact bytes our encoder produces."""
    record = sign_record(WRITER, KEY, VALUE, EXPIRATION)
    return {
        "dht-ping.listening": _fields(messages.ping(7001)),
        "dht-ping.client": _fields(messages.ping(None)),
        "dht-ping.announced": _fields(messages.ping(7443, "relay.example.org")),
        "dht-pong.basic": _fields(messages.pong(WRITER.node_id)),
        "dht-find-node.basic": _fields(messages.find_node(7001, KEY)),
        "dht-nodes.three": _fields(messages.nodes(CONTACTS)),
        "dht-nodes.empty": _fields(messages.nodes([])),
        "dht-find-value.basic": _fields(messages.find_value(None, KEY)),
        "dht-value.found": _fields(messages.value([record], CONTACTS[:1])),
        "dht-value.not-found": _fields(messages.value([], CONTACTS)),
        "dht-store.block-record": _fields(messages.store(7001, record)),
        "dht-stored.kept": _fields(messages.stored(True)),
        "contact.ipv6": cbor2.dumps(messages.contact_to_wire(CONTACTS[2]), canonical=True),
        "record.block": cbor2.dumps(record.to_wire(), canonical=True),
        "record.swarm-member": cbor2.dumps(_member_record().to_wire(), canonical=True),
        "signed-payload.block": signing_payload(KEY, WRITER.node_id, VALUE, EXPIRATION),
        "block-key-input.block": cbor2.dumps(
            [BLOCK_KEY_DOMAIN, "smollm2-135m@0123abcd", 4], canonical=True
        ),
    }


def invalid_examples() -> dict[str, bytes]:
    """Encodings each rule must refuse."""
    record = sign_record(WRITER, KEY, VALUE, EXPIRATION).to_wire()
    contact = messages.contact_to_wire(CONTACTS[0])
    return {
        "record.short-signature": cbor2.dumps(record | {"signature": b"\x00" * 63}),
        "record.value-not-a-map": cbor2.dumps(record | {"value": [1, 2]}),
        "record.no-subkey": cbor2.dumps({k: v for k, v in record.items() if k != "subkey"}),
        "record.membership-not-bytes": cbor2.dumps(record | {"membership": "member"}),
        "contact.port-zero": cbor2.dumps(contact | {"port": 0}),
        "contact.short-id": cbor2.dumps(contact | {"id": b"\x01" * 31}),
        "dht-ping.text-port": cbor2.dumps({"v": 1, "port": "7001"}),
        "dht-find-node.no-target": cbor2.dumps({"v": 1, "port": 7001}),
        "dht-nodes.too-many": cbor2.dumps({"v": 1, "nodes": [contact] * 33}),
        "dht-store.bad-version": cbor2.dumps({"v": 2, "port": None, "record": record}),
    }
