"""Helpers of the swarm tests: a swarm key, members and outsiders, a fake clock."""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock

from meshnode.identity import Identity
from meshnode.swarm.membership import issue_membership
from meshnode.swarm.policy import SwarmPolicy

NOW = 1_800_000_000.0
DAY = 86400.0


class Swarm:
    """A swarm key and its policy over a fake clock (``clock.advance`` moves time)."""

    def __init__(self, revoked_path=None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.policy = SwarmPolicy(self.key.public_key(), self.clock, revoked_path,
                                  reload_interval=5.0)

    def member(self, days: float = 1.0) -> Identity:
        """A fresh identity carrying a membership valid ``days`` from now."""
        identity = Identity.ephemeral()
        certificate = issue_membership(self.key, identity.node_id, NOW, NOW + days * DAY)
        return dataclasses.replace(identity, membership=certificate.encode())
