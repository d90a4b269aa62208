"""Record signing and validation: every reason a record is refused."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest

from meshnode.dht.node import block_key
from meshnode.dht.records import (
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    SignedRecord,
    sign_record,
    signing_payload,
    validate_record,
)
from meshnode.errors import InvalidRecord
from meshnode.identity import Identity

NOW = 1_000_000.0
KEY = block_key("model-fingerprint", 3)
VALUE = {"host": "127.0.0.1", "port": 7000, "span": [0, 10], "throughput": 12.5}


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.ephemeral()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.ephemeral()


def test_a_signed_record_is_valid_and_survives_the_wire(alice: Identity) -> None:
    """When a node signs a record, then it validates, also after a CBOR round trip."""
    record = sign_record(alice, KEY, VALUE, NOW + 60)
    assert record.subkey == alice.node_id
    validate_record(record, NOW)
    again = SignedRecord.from_wire(cbor2.loads(cbor2.dumps(record.to_wire())))
    assert again == record
    validate_record(again, NOW)


def test_an_integer_expiration_signs_like_the_same_float(alice: Identity) -> None:
    """When a peer encodes the expiration as an integer, then the signature still holds."""
    record = sign_record(alice, KEY, VALUE, NOW + 60)
    wire = record.to_wire() | {"expiration": int(NOW + 60)}
    validate_record(SignedRecord.from_wire(wire), NOW)


def test_tampered_value_is_refused(alice: Identity) -> None:
    """When a relay changes the value, then the signature fails."""
    record = sign_record(alice, KEY, VALUE, NOW + 60)
    forged = dataclasses.replace(record, value=VALUE | {"port": 6666})
    with pytest.raises(InvalidRecord, match="bad signature"):
        validate_record(forged, NOW)


def test_extended_expiration_is_refused(alice: Identity) -> None:
    """When a relay pushes the expiry later, then the signature fails."""
    record = sign_record(alice, KEY, VALUE, NOW + 60)
    with pytest.raises(InvalidRecord, match="bad signature"):
        validate_record(dataclasses.replace(record, expiration=NOW + 120), NOW)


def test_wrong_signer_is_refused(alice: Identity, bob: Identity) -> None:
    """When Bob signs a record claiming Alice's sub-key and public key, then the
    signature fails."""
    record = sign_record(alice, KEY, VALUE, NOW + 60)
    payload = signing_payload(KEY, alice.node_id, VALUE, NOW + 60)
    forged = dataclasses.replace(record, signature=bob.sign(payload))
    with pytest.raises(InvalidRecord, match="bad signature"):
        validate_record(forged, NOW)


def test_subkey_of_another_node_is_refused(alice: Identity, bob: Identity) -> None:
    """When Bob validly signs a record under Alice's sub-key, then it is refused:
    nobody announces for another node."""
    payload = signing_payload(KEY, alice.node_id, VALUE, NOW + 60)
    forged = SignedRecord(
        KEY, alice.node_id, VALUE, NOW + 60, bob.public_key_raw, bob.sign(payload)
    )
    with pytest.raises(InvalidRecord, match="sub-key is not the signer"):
        validate_record(forged, NOW)


def test_expired_record_is_refused(alice: Identity) -> None:
    """When the expiry has passed, then the record is refused."""
    record = sign_record(alice, KEY, VALUE, NOW - 1)
    with pytest.raises(InvalidRecord, match="expired"):
        validate_record(record, NOW)
    with pytest.raises(InvalidRecord, match="expired"):
        validate_record(sign_record(alice, KEY, VALUE, NOW), NOW)


def test_expiry_too_far_out_is_refused(alice: Identity) -> None:
    """When the expiry is more than MAX_RECORD_TTL ahead, then the record is refused."""
    validate_record(sign_record(alice, KEY, VALUE, NOW + MAX_RECORD_TTL), NOW)
    record = sign_record(alice, KEY, VALUE, NOW + MAX_RECORD_TTL + 1)
    with pytest.raises(InvalidRecord, match="too far out"):
        validate_record(record, NOW)


def test_oversized_value_is_refused(alice: Identity) -> None:
    """When the value's encoding is over MAX_VALUE_BYTES, then the record is refused."""
    record = sign_record(alice, KEY, {"blob": b"x" * MAX_VALUE_BYTES}, NOW + 60)
    with pytest.raises(InvalidRecord, match="too large"):
        validate_record(record, NOW)


def test_unencodable_value_is_refused(alice: Identity) -> None:
    """When the value cannot be CBOR-encoded, then signing refuses it."""
    with pytest.raises(InvalidRecord, match="CBOR"):
        sign_record(alice, KEY, {"x": object()}, NOW + 60)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"key": b"short"}, "key must be 32 bytes"),
        ({"subkey": "text"}, "subkey must be 32 bytes"),
        ({"signature": b""}, "signature must be 64 bytes"),
        ({"value": [1, 2]}, "value must be a map"),
        ({"expiration": "soon"}, "expiration must be a number"),
        ({"expiration": True}, "expiration must be a number"),
        ({"expiration": float("inf")}, "finite"),
    ],
)
def test_malformed_wire_records_are_refused(alice: Identity, change: dict, reason: str) -> None:
    """When a peer sends a record map with a missing or mistyped field, then parsing
    refuses it before any cryptography."""
    wire = sign_record(alice, KEY, VALUE, NOW + 60).to_wire() | change
    with pytest.raises(InvalidRecord, match=reason):
        SignedRecord.from_wire(wire)
    with pytest.raises(InvalidRecord, match="not a map"):
        SignedRecord.from_wire([wire])


def test_block_keys_are_distinct_and_stable() -> None:
    """When two blocks or two models differ, then their keys differ; the same block
    always maps to the same 32-byte key."""
    keys = {block_key(model, index) for model in ("a", "b", "a1") for index in range(12)}
    assert len(keys) == 36
    assert block_key("a", 1) == block_key("a", 1)
    assert len(block_key("a", 1)) == 32
