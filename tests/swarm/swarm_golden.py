"""Golden encodings of schemas/swarm.cddl, produced by meshnode.swarm's own encoder.

``tests/test_schemas.py`` checks that these bytes equal ``schemas/golden/swarm/``
(see ``schemas/README.md``); ``MESHNODE_WRITE_GOLDEN=1`` rewrites the files.
"""

from __future__ import annotations

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.identity import Identity
from meshnode.swarm.membership import issue_membership, membership_payload

# Fixed keys: Ed25519 signatures are deterministic, so the golden bytes are too.
SWARM_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
MEMBER = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
ISSUED = 1_800_000_000.0
EXPIRES = ISSUED + 30 * 86400.0


def member_certificate():
    return issue_membership(SWARM_KEY, MEMBER.node_id, ISSUED, EXPIRES)


def golden_examples() -> dict[str, bytes]:
    """``"<rule>.<example>"`` -> the exact bytes our encoder produces."""
    certificate = member_certificate()
    return {
        "membership-certificate.thirty-days": certificate.encode(),
        "membership-payload.thirty-days": membership_payload(
            certificate.swarm, certificate.node, ISSUED, EXPIRES),
    }


def invalid_examples() -> dict[str, bytes]:
    """Encodings each rule must refuse."""
    fields = member_certificate().to_wire()
    return {
        "membership-certificate.short-signature": cbor2.dumps(fields | {"signature": b"\0" * 63}),
        "membership-certificate.no-expiry": cbor2.dumps(
            {k: v for k, v in fields.items() if k != "expires"}),
        "membership-certificate.bad-version": cbor2.dumps(fields | {"v": 2}),
    }
