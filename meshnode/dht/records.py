"""Signed DHT records: one value per (key, sub-key), written and signed by its owner.

A key (for instance a model block) holds one record per sub-key, and the
sub-key is the writer's node id, as Petals stores a block's servers. The
writer signs, with its Ed25519 node key, the canonical CBOR encoding of
``[RECORD_DOMAIN, key, subkey, value, expiration]``; anyone can check that the
record is intact and that its sub-key is the id of the key that signed it, so
nobody can announce for another node or push its entry out.

``validate_record`` is the single gate: stores run it before keeping a record
and lookups run it on every record a peer returns.

A writer that belongs to a private swarm attaches its membership certificate
(``membership``, bytes; ``meshnode.swarm.membership``) outside the signed
payload: the certificate is signed by the swarm key and names the writer's
node id, so it needs no second signature. Public records have none, and their
encoding is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cbor2

from meshnode.errors import IdentityError, InvalidRecord
from meshnode.identity import NODE_ID_BYTES, Identity, NodeID, node_id_of, verify_signature

RECORD_DOMAIN = "meshnode.dht.record.v1"
"""Separates record signatures from any other use of a node key."""

MAX_RECORD_TTL = 3600.0
"""Seconds: a record may expire at most this far after it reaches a node."""

MAX_VALUE_BYTES = 2048
"""Bytes of the value's canonical CBOR encoding."""

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class SignedRecord:
    """One sub-key's value under a key, with its expiry and its writer's signature."""

    key: bytes
    subkey: NodeID
    value: dict[str, Any]
    expiration: float
    public_key: bytes
    signature: bytes
    membership: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        """The ``record`` map of ``schemas/dht.cddl``."""
        fields = {
            "key": self.key,
            "subkey": self.subkey,
            "value": self.value,
            "expiration": self.expiration,
            "public_key": self.public_key,
            "signature": self.signature,
        }
        if self.membership is not None:
            fields["membership"] = self.membership
        return fields

    @classmethod
    def from_wire(cls, fields: object) -> SignedRecord:
        """Parse a ``record`` map; ``InvalidRecord`` when a field is missing or mistyped.

        This checks shapes only: call ``validate_record`` before trusting it.
        """
        if not isinstance(fields, dict):
            raise InvalidRecord("malformed record: not a map")
        key = _bytes_field(fields, "key", NODE_ID_BYTES)
        subkey = _bytes_field(fields, "subkey", NODE_ID_BYTES)
        public_key = _bytes_field(fields, "public_key", PUBLIC_KEY_BYTES)
        signature = _bytes_field(fields, "signature", SIGNATURE_BYTES)
        value = fields.get("value")
        if not isinstance(value, dict):
            raise InvalidRecord("malformed record: value must be a map")
        expiration = fields.get("expiration")
        if isinstance(expiration, bool) or not isinstance(expiration, (int, float)):
            raise InvalidRecord("malformed record: expiration must be a number")
        if not math.isfinite(expiration):
            raise InvalidRecord("malformed record: expiration must be finite")
        membership = fields.get("membership")
        if membership is not None and not isinstance(membership, bytes):
            raise InvalidRecord("malformed record: membership must be bytes")
        return cls(key, subkey, value, float(expiration), public_key, signature, membership)


def _bytes_field(fields: dict[str, Any], name: str, size: int) -> bytes:
    value = fields.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidRecord(f"malformed record: {name} must be {size} bytes")
    return value


def encode_value(value: dict[str, Any]) -> bytes:
    """The canonical CBOR encoding of a value; ``InvalidRecord`` if it has none."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise InvalidRecord(f"value is not CBOR-encodable: {exc}") from exc


def signing_payload(key: bytes, subkey: NodeID, value: dict[str, Any], expiration: float) -> bytes:
    """The bytes a record's signature covers."""
    try:
        return cbor2.dumps([RECORD_DOMAIN, key, subkey, value, float(expiration)], canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise InvalidRecord(f"value is not CBOR-encodable: {exc}") from exc


def sign_record(
    identity: Identity, key: bytes, value: dict[str, Any], expiration: float
) -> SignedRecord:
    """A record under ``key`` whose sub-key is ``identity``'s node id, signed by it."""
    if not isinstance(value, dict):
        raise InvalidRecord("value must be a map")
    expiration = float(expiration)
    payload = signing_payload(key, identity.node_id, value, expiration)
    return SignedRecord(
        key=key,
        subkey=identity.node_id,
        value=value,
        expiration=expiration,
        public_key=identity.public_key_raw,
        signature=identity.sign(payload),
        membership=identity.membership,
    )


def validate_record(
    record: SignedRecord,
    now: float,
    max_ttl: float = MAX_RECORD_TTL,
    max_value_bytes: int = MAX_VALUE_BYTES,
) -> None:
    """Raise ``InvalidRecord`` unless ``record`` may be stored or believed at time ``now``.

    Checks, cheapest first: the value's size, the expiry (not past, not more
    than ``max_ttl`` ahead), that the sub-key is the signer's node id, and the
    signature.
    """
    size = len(encode_value(record.value))
    if size > max_value_bytes:
        raise InvalidRecord(f"value too large: {size} bytes > {max_value_bytes}")
    if record.expiration <= now:
        raise InvalidRecord("record expired")
    if record.expiration > now + max_ttl:
        raise InvalidRecord(f"expiration too far out: more than {max_ttl:g} s ahead")
    try:
        signer = node_id_of(record.public_key)
    except IdentityError as exc:
        raise InvalidRecord(f"bad public key: {exc}") from exc
    if signer != record.subkey:
        raise InvalidRecord("sub-key is not the signer's node id")
    payload = signing_payload(record.key, record.subkey, record.value, record.expiration)
    if not verify_signature(record.public_key, record.signature, payload):
        raise InvalidRecord("bad signature")
