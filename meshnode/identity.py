"""Node identity: an Ed25519 key, its self-signed certificate, node ids and peer addresses.

A node is its key. The key lives in the node's data folder (``node_key.pem``,
mode 0600, created on first start); the certificate presented in TLS is a
self-signed X.509 certificate made from it at load time. The node id is the
SHA-256 of the public key's SubjectPublicKeyInfo DER, printed as lowercase hex.

A ``PeerAddress`` is ``host:port`` or ``host:port#<hex node id>``; the second
form pins the node id, and the TLS layer drops a peer that presents another
one (``meshnode.tls``). IPv6 hosts are written in brackets: ``[::1]:7000``.

A node of a private swarm also carries its membership certificate (opaque
bytes here, defined by ``meshnode.swarm.membership``): it rides in the TLS
certificate as a non-critical extension (``MEMBERSHIP_EXTENSION_OID``), so the
proof of membership is presented in the same handshake that proves the key.
Nodes of no swarm ignore the extension.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID, ObjectIdentifier

from meshnode.errors import BadAddress, IdentityError

NodeID = bytes
"""32 bytes: SHA-256 of the Ed25519 SubjectPublicKeyInfo DER."""

NODE_ID_BYTES = 32
KEY_FILE_NAME = "node_key.pem"
KEY_FILE_MODE = 0o600
CERT_VALIDITY = datetime.timedelta(days=3650)
# Certificates are checked by node id, never by date; a fixed not-before in the
# past keeps a peer with a skewed clock from rejecting us at the handshake.
CERT_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
#: where a swarm membership certificate rides in the TLS certificate (a private-use
#: arc under the UUID-derived OID space of ITU-T X.667, 2.25.<128-bit number>)
MEMBERSHIP_EXTENSION_OID = ObjectIdentifier("2.25.267347802731339524542339366420874398311")


def _spki_der(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def node_id_of(public_key_raw: bytes) -> NodeID:
    """The node id of a 32-byte raw Ed25519 public key."""
    try:
        public_key = Ed25519PublicKey.from_public_bytes(public_key_raw)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"not an Ed25519 public key: {exc}") from exc
    return node_id_of_key(public_key)


def node_id_of_key(public_key: Ed25519PublicKey) -> NodeID:
    """The node id of an Ed25519 public key object (as found in a peer certificate)."""
    return hashlib.sha256(_spki_der(public_key)).digest()


def node_id_of_certificate(certificate: x509.Certificate) -> NodeID:
    """The node id bound to a peer certificate; ``IdentityError`` unless its key is Ed25519."""
    public_key = certificate.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise IdentityError(f"peer key is {type(public_key).__name__}, not Ed25519")
    return node_id_of_key(public_key)


def verify_signature(public_key_raw: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` by that key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def format_node_id(node_id: NodeID) -> str:
    """Lowercase hex of a node id."""
    return node_id.hex()


def parse_node_id(text: str) -> NodeID:
    """The node id written as 64 hex digits; ``BadAddress`` otherwise."""
    if len(text) != 2 * NODE_ID_BYTES:
        raise BadAddress(f"node id must be {2 * NODE_ID_BYTES} hex digits: {text!r}")
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise BadAddress(f"node id is not hex: {text!r}") from exc


def membership_of_certificate(certificate: x509.Certificate) -> bytes | None:
    """The membership certificate bytes a peer's TLS certificate carries, if any."""
    try:
        extension = certificate.extensions.get_extension_for_oid(MEMBERSHIP_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    value = extension.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _self_signed_certificate(
    key: Ed25519PrivateKey, node_id: NodeID, membership: bytes | None = None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, format_node_id(node_id))])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(node_id[:16], "big") >> 1 or 1)
        .not_valid_before(CERT_NOT_BEFORE)
        .not_valid_after(CERT_NOT_BEFORE + CERT_VALIDITY)
    )
    if membership is not None:
        extension = x509.UnrecognizedExtension(MEMBERSHIP_EXTENSION_OID, membership)
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, None)


@dataclass(frozen=True)
class Identity:
    """A node's Ed25519 private key, its node id and self-signed certificate.

    ``membership``: a swarm membership certificate (bytes) to present in the TLS
    certificate, or ``None`` for a node of no private swarm
    (``dataclasses.replace(identity, membership=...)`` gives the same key with it).
    """

    private_key: Ed25519PrivateKey = field(repr=False)
    membership: bytes | None = field(default=None, repr=False)
    node_id: NodeID = field(init=False)
    public_key_raw: bytes = field(init=False)
    certificate: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        public_key = self.private_key.public_key()
        node_id = node_id_of_key(public_key)
        object.__setattr__(self, "node_id", node_id)
        object.__setattr__(
            self,
            "public_key_raw",
            public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        )
        certificate = _self_signed_certificate(self.private_key, node_id, self.membership)
        object.__setattr__(self, "certificate", certificate)

    @classmethod
    def ephemeral(cls) -> Identity:
        """A fresh identity kept only in memory (tests, short-lived clients)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load ``data_dir/node_key.pem``, creating it (mode 0600) on first start."""
        data_dir = Path(data_dir)
        path = data_dir / KEY_FILE_NAME
        if path.exists():
            return cls._load(path)
        data_dir.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two processes starting at once must not overwrite each other's key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except FileExistsError:
            return cls._load(path)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        os.chmod(path, KEY_FILE_MODE)
        return cls(key)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path}: unreadable node key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path}: node key is {type(key).__name__}, not Ed25519")
        return cls(key)

    @property
    def printable_id(self) -> str:
        """The node id as lowercase hex."""
        return format_node_id(self.node_id)

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self.private_key.sign(data)

    def certificate_der(self) -> bytes:
        """The self-signed certificate, DER-encoded."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def fingerprint(self) -> str:
        """SHA-256 of the certificate (for logs; peers are checked by node id)."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()


_ADDRESS = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z]+)\]|(?P<host>[A-Za-z0-9._-]+))"
    r":(?P<port>[0-9]{1,5})(?:#(?P<id>[0-9A-Fa-f]+))?$"
)
MAX_PORT = 65535


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer listens, optionally pinning the node id it must present."""

    host: str
    port: int
    node_id: NodeID | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise BadAddress("empty host")
        if not isinstance(self.port, int) or not 0 < self.port <= MAX_PORT:
            raise BadAddress(f"port out of range: {self.port!r}")
        if self.node_id is not None and len(self.node_id) != NODE_ID_BYTES:
            raise BadAddress(f"node id must be {NODE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parse ``host:port`` or ``host:port#<hex id>`` (IPv6 as ``[addr]:port``)."""
        if not isinstance(text, str):
            raise BadAddress(f"address must be a string, not {type(text).__name__}")
        match = _ADDRESS.match(text.strip())
        if match is None:
            raise BadAddress(f"not an address (host:port[#node_id]): {text!r}")
        host = match["v6"] or match["host"]
        if match["v6"] is not None:
            try:
                ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise BadAddress(f"bad IPv6 address: {host!r}") from exc
        node_id = parse_node_id(match["id"].lower()) if match["id"] else None
        return cls(host, int(match["port"]), node_id)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def with_node_id(self, node_id: NodeID) -> PeerAddress:
        """The same host and port, pinned to ``node_id``."""
        return PeerAddress(self.host, self.port, node_id)

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        text = f"{host}:{self.port}"
        if self.node_id is not None:
            text += f"#{format_node_id(self.node_id)}"
        return text
