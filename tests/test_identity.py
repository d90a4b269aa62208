"""Node identity: key on disk, node id from the public key, signatures, pinned addresses."""

from __future__ import annotations

import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from meshnode.errors import BadAddress, IdentityError
from meshnode.identity import (
    Identity,
    PeerAddress,
    format_node_id,
    node_id_of,
    node_id_of_certificate,
    verify_signature,
)


def test_key_created_once_with_mode_0600(tmp_path):
    """When a node starts twice in one data folder, then the key is created once (0600) and kept."""
    first = Identity.load_or_create(tmp_path / "node")
    key_file = tmp_path / "node" / "node_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = Identity.load_or_create(tmp_path / "node")
    assert second.node_id == first.node_id


def test_unreadable_key_file_is_an_identity_error(tmp_path):
    """When the key file is garbage, then IdentityError, not a crash."""
    (tmp_path / "node_key.pem").write_bytes(b"not a key")
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path)


def test_node_id_is_sha256_of_spki_der():
    """The node id is SHA-256 of the SubjectPublicKeyInfo DER, from raw key and cert alike."""
    identity = Identity.ephemeral()
    spki = identity.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert identity.node_id == hashlib.sha256(spki).digest()
    assert node_id_of(identity.public_key_raw) == identity.node_id
    assert node_id_of_certificate(identity.certificate) == identity.node_id
    assert format_node_id(identity.node_id) == identity.node_id.hex() == identity.printable_id


def test_certificate_is_self_signed_by_the_node_key():
    """The certificate's subject names the node id and it verifies with its own key."""
    identity = Identity.ephemeral()
    certificate = identity.certificate
    assert certificate.issuer == certificate.subject
    certificate.verify_directly_issued_by(certificate)
    assert identity.printable_id in certificate.subject.rfc4514_string()


def test_signatures():
    """A signature verifies with the signer's raw key only, over the signed bytes only."""
    identity, other = Identity.ephemeral(), Identity.ephemeral()
    signature = identity.sign(b"record")
    assert verify_signature(identity.public_key_raw, signature, b"record")
    assert not verify_signature(identity.public_key_raw, signature, b"recorD")
    assert not verify_signature(other.public_key_raw, signature, b"record")
    assert not verify_signature(b"short", signature, b"record")


def test_node_id_of_rejects_junk_keys():
    with pytest.raises(IdentityError):
        node_id_of(b"\x01" * 31)


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:7000", "node-1.example:1", "[::1]:65535", "[fe80::1]:80#" + "ab" * 32,
     "localhost:7000#" + "0f" * 32],
)
def test_address_round_trips(text):
    """When an address is parsed and printed, then the text comes back."""
    address = PeerAddress.parse(text)
    assert str(address) == text
    assert PeerAddress.parse(str(address)) == address


def test_address_pins_the_node_id():
    identity = Identity.ephemeral()
    address = PeerAddress.parse(f"[::1]:7000#{identity.printable_id.upper()}")
    assert (address.host, address.port, address.node_id) == ("::1", 7000, identity.node_id)
    assert PeerAddress.parse("h:1").node_id is None


@pytest.mark.parametrize(
    "junk",
    ["", "host", "host:", ":80", "host:0", "host:65536", "host:80#abc", "host:80#" + "zz" * 32,
     "::1:80", "[nothex]:80", "host:80#" + "ab" * 33, "ho st:80", "host:-1", 7],
)
def test_junk_addresses_are_bad(junk):
    """When an address is junk, then BadAddress."""
    with pytest.raises(BadAddress):
        PeerAddress.parse(junk)
