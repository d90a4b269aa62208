"""Helpers for tests and demos that run a real mesh on loopback.

- ``processes``: ``LocalMesh`` starts a bootstrap node and workers as separate
  ``twistd`` processes (ephemeral ports, own data dir, pidfile and logfile each),
  reads their pinned addresses, and stops them (SIGTERM, then SIGKILL).
"""
