"""``SwarmPolicy``: what a member of a private swarm enforces, and ``join_swarm``.

A node started with ``--swarm SWARM_PUB`` holds one policy. The wire asks it
about every peer once the TLS handshake has proved the peer's node id
(``check_peer``, before any frame of the peer is read); the DHT asks it about
every record it would store or believe (``check_record``). A peer or record
passes when it carries a membership certificate signed by this swarm's key
for exactly that node id, unexpired now, and the node id is not on the
revocation list.

The revocation list (``<folder of swarm.pub>/revoked``) is re-read by
``reload``: every ``RELOAD_INTERVAL`` seconds once ``start`` ran, and on
SIGHUP where the entry point installed ``reload_on_sighup``. Each reload
tells its listeners (the endpoint drops connections to peers that no longer
pass; stores stop returning their records at once, as ``check_record`` runs
on the way out too).

Time comes from the injected clock (``seconds()``), never the wall clock.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from meshnode.errors import NotAMember, SwarmError
from meshnode.identity import Identity, NodeID, membership_of_certificate
from meshnode.swarm.keys import load_swarm_public_key, raw_public_key, swarm_id
from meshnode.swarm.membership import MembershipCertificate, read_membership
from meshnode.swarm.revocation import REVOKED_FILE_NAME, read_revoked

#: seconds between two reads of the revocation list
RELOAD_INTERVAL = 10.0

log = Logger()


class SwarmPolicy:
    """Admits peers and DHT records of one private swarm; see the module docstring."""

    def __init__(
        self,
        swarm_public_key: Any,
        clock: Any,
        revoked_path: Path | None = None,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> None:
        self.swarm_key_raw = raw_public_key(swarm_public_key)
        self.swarm_id = swarm_id(swarm_public_key)
        self.clock = clock
        self.revoked_path = revoked_path
        self.reload_interval = reload_interval
        self.revoked: frozenset[NodeID] = frozenset()
        self._listeners: list[Callable[[], None]] = []
        self._loop: LoopingCall | None = None
        if revoked_path is not None:
            self.revoked = read_revoked(revoked_path)

    @classmethod
    def from_file(cls, swarm_pub: Path, clock: Any, **options: Any) -> SwarmPolicy:
        """The policy of the swarm whose ``swarm.pub`` is at ``swarm_pub`` (file or folder);
        its revocation list is the ``revoked`` file beside it."""
        swarm_pub = Path(swarm_pub)
        folder = swarm_pub if swarm_pub.is_dir() else swarm_pub.parent
        return cls(load_swarm_public_key(swarm_pub), clock, folder / REVOKED_FILE_NAME, **options)

    # -- checks --------------------------------------------------------------

    def check_membership(self, membership: bytes | None, node_id: NodeID) -> None:
        """Raise ``NotAMember`` unless ``membership`` admits ``node_id`` now."""
        if membership is None:
            raise NotAMember(f"this node belongs to private swarm {self.swarm_id[:16]}; "
                             "present a membership certificate (meshnode swarm admit)")
        certificate = MembershipCertificate.decode(membership)
        certificate.verify(self.swarm_key_raw, node_id, self.clock.seconds())
        if node_id in self.revoked:
            raise NotAMember(f"node {node_id.hex()[:16]} is revoked from this swarm")

    def check_peer(self, certificate: x509.Certificate, node_id: NodeID) -> None:
        """The wire's gate: the TLS certificate of a peer whose node id is ``node_id``."""
        self.check_membership(membership_of_certificate(certificate), node_id)

    def check_record(self, record: Any) -> None:
        """The DHT's gate: a signed record whose writer is ``record.subkey``."""
        try:
            self.check_membership(getattr(record, "membership", None), record.subkey)
        except NotAMember as exc:
            raise NotAMember(f"record of {record.subkey.hex()[:16]}: {exc}") from None

    def admits_record(self, record: Any) -> bool:
        try:
            self.check_record(record)
        except NotAMember:
            return False
        return True

    # -- revocation list ---------------------------------------------------------

    def on_reload(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every reload of the revocation list."""
        self._listeners.append(listener)

    def reload(self) -> frozenset[NodeID]:
        """Re-read the revocation list and tell the listeners; a bad file keeps the old list."""
        if self.revoked_path is not None:
            try:
                revoked = read_revoked(self.revoked_path)
            except SwarmError as exc:
                log.warn("keeping the previous revocation list: {error}", error=exc)
            else:
                if revoked != self.revoked:
                    log.info("revocation list: {n} node(s)", n=len(revoked))
                self.revoked = revoked
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one bad listener must not stop the others
                log.failure("revocation listener failed")
        return self.revoked

    def start(self) -> None:
        """Reload every ``reload_interval`` seconds on the clock until ``stop``."""
        if self._loop is None and self.reload_interval > 0:
            self._loop = LoopingCall(self.reload)
            self._loop.clock = self.clock
            self._loop.start(self.reload_interval, now=False).addErrback(
                lambda failure: log.failure("revocation reload loop ended", failure))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def join_swarm(
    swarm_pub: Path | None, identity: Identity, data_dir: Path | None, clock: Any
) -> tuple[Identity, SwarmPolicy | None]:
    """``identity`` with its membership certificate from ``data_dir``, and the swarm's policy.

    With no ``swarm_pub`` (a public node), ``identity`` unchanged and no policy.
    ``SwarmError`` when the certificate is missing, for another node or another
    swarm, or expired: a node that cannot prove membership does not start.
    """
    if swarm_pub is None:
        return identity, None
    policy = SwarmPolicy.from_file(swarm_pub, clock)
    membership = identity.membership
    if membership is None:
        if data_dir is None:
            raise SwarmError("--swarm needs --data-dir: the folder holding this node's key "
                             "and its membership certificate (meshnode swarm admit)")
        membership = read_membership(data_dir)
    try:
        policy.check_membership(membership, identity.node_id)
    except NotAMember as exc:
        raise SwarmError(f"this node cannot prove membership of swarm "
                         f"{policy.swarm_id[:16]}: {exc}") from None
    return dataclasses.replace(identity, membership=membership), policy


def start_swarm(policy: SwarmPolicy | None, reactor: Any) -> None:
    """A node's start-up step: periodic reloads, and a reload on SIGHUP where possible."""
    if policy is not None:
        policy.start()
        reload_on_sighup(policy, reactor)


def reload_on_sighup(policy: SwarmPolicy, reactor: Any) -> bool:
    """Re-read the revocation list on SIGHUP (main thread only); whether it was installed."""
    try:
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(policy.reload))
    except (ValueError, AttributeError):  # not the main thread, or no SIGHUP here
        return False
    return True
