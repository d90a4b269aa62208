"""Private swarms: a swarm key that signs membership certificates, checked at connection set-up.

- ``keys``: the swarm key pair on disk (``swarm.key`` secret, ``swarm.pub`` shared)
  and the swarm id.
- ``membership``: the membership certificate (CBOR, ``schemas/swarm.cddl``):
  issue, encode, decode, verify; where a node keeps its own.
- ``revocation``: the revocation list file (``<swarm folder>/revoked``).
- ``policy``: ``SwarmPolicy``, what a member node enforces: which peers it
  talks to and which DHT records it stores and believes; ``join_swarm`` gives a
  node its membership-carrying identity and its policy.
"""
