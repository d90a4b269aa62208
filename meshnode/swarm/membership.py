"""Membership certificates: the swarm key's signed statement "node N is a member until T".

One certificate is a canonical CBOR map (``schemas/swarm.cddl``,
``membership-certificate``)::

    {v: 1, swarm: <raw swarm public key>, node: <node id>,
     issued: <float>, expires: <float>, signature: <64 bytes>}

The signature is the swarm key's Ed25519 signature of the canonical CBOR
encoding of ``[MEMBERSHIP_DOMAIN, swarm, node, issued, expires]``. A member
keeps its own in ``<data dir>/swarm_membership.cbor`` (written by
``meshnode swarm admit``) and presents it in its TLS certificate
(``meshnode.identity``) and beside each DHT record it writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.errors import NotAMember, SwarmError
from meshnode.identity import NODE_ID_BYTES, NodeID, verify_signature
from meshnode.swarm.keys import raw_public_key

MEMBERSHIP_DOMAIN = "meshnode.swarm.member.v1"
"""Separates membership signatures from any other use of a swarm key."""

MEMBERSHIP_VERSION = 1
MEMBERSHIP_FILE_NAME = "swarm_membership.cbor"
#: longest accepted encoding of one certificate (it rides in every TLS handshake)
MAX_MEMBERSHIP_BYTES = 512
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class MembershipCertificate:
    """``node`` belongs to the swarm whose public key is ``swarm`` from ``issued`` to
    ``expires``."""

    swarm: bytes
    node: NodeID
    issued: float
    expires: float
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        """The ``membership-certificate`` map of ``schemas/swarm.cddl``."""
        return {
            "v": MEMBERSHIP_VERSION,
            "swarm": self.swarm,
            "node": self.node,
            "issued": self.issued,
            "expires": self.expires,
            "signature": self.signature,
        }

    def encode(self) -> bytes:
        return cbor2.dumps(self.to_wire(), canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> MembershipCertificate:
        """Parse the encoding; ``NotAMember`` when it is not a well-formed certificate."""
        if not isinstance(data, bytes) or len(data) > MAX_MEMBERSHIP_BYTES:
            raise NotAMember("membership certificate missing or too large")
        try:
            fields = cbor2.loads(data)
        except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
            raise NotAMember(f"membership certificate is not CBOR: {exc}") from exc
        if not isinstance(fields, dict) or fields.get("v") != MEMBERSHIP_VERSION:
            raise NotAMember("membership certificate: not a version 1 map")
        swarm, node, signature = (fields.get(k) for k in ("swarm", "node", "signature"))
        if not (_is_bytes(swarm, 32) and _is_bytes(node, NODE_ID_BYTES)
                and _is_bytes(signature, 64)):
            raise NotAMember("membership certificate: malformed swarm, node or signature")
        issued, expires = fields.get("issued"), fields.get("expires")
        if not (_is_time(issued) and _is_time(expires)):
            raise NotAMember("membership certificate: issued and expires must be numbers")
        return cls(swarm, node, float(issued), float(expires), signature)

    def verify(self, swarm_key_raw: bytes, node_id: NodeID, now: float) -> None:
        """Raise ``NotAMember`` unless this certificate admits ``node_id`` to that swarm now."""
        if self.swarm != swarm_key_raw:
            raise NotAMember("membership certificate is for another swarm")
        if self.node != node_id:
            raise NotAMember("membership certificate names another node")
        payload = membership_payload(self.swarm, self.node, self.issued, self.expires)
        if not verify_signature(self.swarm, self.signature, payload):
            raise NotAMember("membership certificate: bad signature")
        if now >= self.expires:
            raise NotAMember("membership certificate expired")


def _is_bytes(value: object, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _is_time(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def membership_payload(swarm: bytes, node: NodeID, issued: float, expires: float) -> bytes:
    """The bytes a membership signature covers."""
    return cbor2.dumps(
        [MEMBERSHIP_DOMAIN, swarm, node, float(issued), float(expires)], canonical=True
    )


def issue_membership(
    swarm_key: Ed25519PrivateKey, node_id: NodeID, issued: float, expires: float
) -> MembershipCertificate:
    """A certificate admitting ``node_id`` until ``expires``, signed by ``swarm_key``."""
    if len(node_id) != NODE_ID_BYTES:
        raise SwarmError(f"a node id is {NODE_ID_BYTES} bytes")
    if expires <= issued:
        raise SwarmError("a membership must expire after it is issued")
    swarm = raw_public_key(swarm_key.public_key())
    payload = membership_payload(swarm, node_id, issued, expires)
    return MembershipCertificate(swarm, node_id, float(issued), float(expires),
                                 swarm_key.sign(payload))


def write_membership(data_dir: Path, certificate: MembershipCertificate) -> Path:
    """Keep ``certificate`` as ``data_dir``'s membership (replacing an older one)."""
    path = Path(data_dir) / MEMBERSHIP_FILE_NAME
    partial = path.with_suffix(".partial")
    partial.write_bytes(certificate.encode())
    os.replace(partial, path)
    return path


def read_membership(data_dir: Path) -> bytes:
    """The membership certificate bytes kept in ``data_dir``; ``SwarmError`` if none."""
    path = Path(data_dir) / MEMBERSHIP_FILE_NAME
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SwarmError(
            f"{path}: no membership certificate ({exc.strerror}); "
            f"run `meshnode swarm admit SWARM_DIR {data_dir}`"
        ) from exc
