"""Helpers for tests and demos that run a real mesh on loopback.

- ``processes``: ``LocalMesh`` starts a bootstrap node and workers as separate
  ``twistd`` processes (ephemeral ports, own data dir, pidfile and logfile each),
  reads their pinned addresses, and stops them (SIGTERM, then SIGKILL); puts nodes
  behind relays (``relay_delay_ms=``) announced with ``--announce-address``.
- ``relay``: ``DelayingRelay``, a TCP relay holding every byte D ms each way (also a
  process: ``python -m meshnode.testing.relay``).
"""
