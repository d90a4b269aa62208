"""``DHTNode``: the DHT's facade. Join, store a signed record, get a key's records, stop.

Usage (inside a coroutine, with an ``Endpoint`` that listens)::

    node = DHTNode(endpoint, clock=reactor, reactor=reactor)
    await node.bootstrap([PeerAddress.parse("10.0.0.1:7000#ab12...")])
    key = block_key(model.fingerprint, 7)
    await node.store(key, {"address": str(endpoint.address)}, reactor.seconds() + 300)
    records = await node.get(key)           # {writer node id: SignedRecord}

A node whose endpoint does not listen (a client) still bootstraps, stores
and gets; peers simply never put it in their tables.

The node runs three periodic jobs on the injected clock: it republishes the
records it owns (re-sending the same signed record to the k nodes now closest
to its key, until it expires: renewing a record means calling ``store`` again
with a later expiry), refreshes buckets with no lookup for
``refresh_interval`` by looking up a random id in them, and sweeps expired
records from its store. ``stop`` ends them and cancels every call in flight;
it does not close the endpoint, which its owner may share.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode.dht.crawling import (
    ALPHA,
    IterativeLookup,
    LookupResult,
    merge_records,
    settle_all,
)
from meshnode.dht.node import Contact, block_key, distance
from meshnode.dht.protocol import REQUEST_TIMEOUT, DHTProtocol
from meshnode.dht.records import SignedRecord, sign_record, validate_record
from meshnode.dht.routing import K, RoutingTable
from meshnode.dht.storage import RecordStore
from meshnode.errors import DHTError
from meshnode.identity import NodeID, PeerAddress

__all__ = ["DHTNode", "block_key"]

REFRESH_INTERVAL = 3600.0
"""Seconds without a lookup after which a bucket is refreshed (the paper's tRefresh)."""

REPUBLISH_INTERVAL = 600.0
"""Seconds between two republications of the records this node owns."""

SWEEP_INTERVAL = 60.0
"""Seconds between two sweeps of expired records."""

VALUE_QUORUM = 3
"""A value lookup stops once this many peers answered with records."""

log = Logger()
T = TypeVar("T")


class DHTNode:
    """One node of the DHT, speaking over ``endpoint``; see the module docstring."""

    def __init__(
        self,
        endpoint: Any,
        clock: Any,
        reactor: Any = None,
        *,
        k: int = K,
        alpha: int = ALPHA,
        request_timeout: float = REQUEST_TIMEOUT,
        refresh_interval: float = REFRESH_INTERVAL,
        republish_interval: float = REPUBLISH_INTERVAL,
        sweep_interval: float = SWEEP_INTERVAL,
        value_quorum: int = VALUE_QUORUM,
        storage: RecordStore | None = None,
        rng: random.Random | None = None,
        announced: PeerAddress | None = None,
    ) -> None:
        """``announced``: where peers reach this node when that is not where ``endpoint``
        listens (``--announce-address``); its requests then carry that host and port."""
        # ``reactor`` is accepted for the package contract; all scheduling goes
        # through ``clock`` and all I/O through ``endpoint``.
        self.endpoint = endpoint
        self.clock = clock
        self.reactor = reactor
        self.identity = endpoint.identity
        self.node_id: NodeID = self.identity.node_id
        self.k = k
        self.alpha = alpha
        self.value_quorum = value_quorum
        self.refresh_interval = refresh_interval
        self.table = RoutingTable(self.node_id, k, clock.seconds())
        # a private swarm's node stores and believes only its members' records
        swarm = getattr(endpoint, "swarm", None)
        admit = swarm.check_record if swarm is not None else None
        self.storage = storage if storage is not None else RecordStore(clock, admit=admit)
        self.protocol = DHTProtocol(
            endpoint, self.table, self.storage, clock, request_timeout, announced=announced
        )
        self.protocol.register()
        self.last_lookup: LookupResult | None = None
        """The most recent lookup's result and cost (rounds, bytes), for benchmarks."""
        self._rng = rng if rng is not None else random.Random()
        self._owned: dict[bytes, SignedRecord] = {}
        self._running: set[Deferred] = set()
        self._stopped = False
        self._loops = [
            self._start_loop(self.republish, republish_interval),
            self._start_loop(self.refresh, min(refresh_interval, 600.0)),
            self._start_loop(self._sweep, sweep_interval),
        ]

    # --- public API --------------------------------------------------------

    def bootstrap(self, addresses: list[PeerAddress]) -> Deferred[int]:
        """Join through ``addresses``; fires with the size of the routing table.

        An address without ``#<node id>`` is pinged once to learn the id it
        claims, then pinged again pinned to it, so TLS proves the claim.
        Fails with ``DHTError`` when none of several addresses answers.
        """
        return self._run(self._bootstrap(addresses))

    def store(self, key: bytes, value: dict[str, Any], expiration: float) -> Deferred[int]:
        """Sign ``value`` under ``key`` (sub-key: our node id) and store it on the k
        nodes closest to ``key``; fires with how many nodes (us included) hold it.
        Fails with ``InvalidRecord`` for a value or expiry no node would accept."""
        return self._run(self._store(key, value, expiration))

    def get(self, key: bytes) -> Deferred[dict[NodeID, SignedRecord]]:
        """The latest unexpired, verified record of each sub-key found under ``key``."""
        return self._run(self._get(key))

    def find_closest(self, target: bytes) -> Deferred[LookupResult]:
        """The k live nodes closest to ``target`` (an iterative FIND_NODE lookup)."""
        return self._run(self._lookup(target))

    def stop(self) -> Deferred[None]:
        """Stop the periodic jobs, cancel every call in flight, answer no more requests."""
        self._stopped = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for d in list(self._running):
            d.cancel()
        self.protocol.stop()
        return succeed(None)

    # --- periodic jobs (public so tests and operators can trigger them) -------

    def republish(self) -> Deferred[int]:
        """Re-send each unexpired owned record to its key's k closest nodes now."""
        return self._run(self._republish())

    def refresh(self) -> Deferred[int]:
        """Look up a random id in each stale bucket; fires with how many were refreshed."""
        return self._run(self._refresh())

    # --- the work ------------------------------------------------------------

    async def _bootstrap(self, addresses: list[PeerAddress]) -> int:
        outcomes = await settle_all([self._run(self._join_through(a)) for a in addresses])
        if addresses and not any(ok for ok, _ in outcomes):
            reasons = "; ".join(str(f.value) for ok, f in outcomes if not ok)
            raise DHTError(f"no bootstrap peer answered: {reasons}")
        await self._lookup(self.node_id)
        own_bucket = self.table.bucket_for(self.node_id)
        targets = [b.random_id(self._rng) for b in self.table.buckets if b is not own_bucket]
        await settle_all([self._run(self._lookup(t)) for t in targets])
        return len(self.table)

    async def _join_through(self, address: PeerAddress) -> NodeID:
        if address.node_id is None:
            claimed = await self.protocol.call_ping(address)
            if claimed == self.node_id:
                return claimed
            address = address.with_node_id(claimed)
        return await self.protocol.call_ping(address)

    async def _store(self, key: bytes, value: dict[str, Any], expiration: float) -> int:
        record = sign_record(self.identity, key, value, expiration)
        validate_record(record, self.clock.seconds())
        current = self._owned.get(key)
        if current is None or current.expiration <= record.expiration:
            self._owned[key] = record
        return await self._publish(record)

    async def _publish(self, record: SignedRecord) -> int:
        result = await self._lookup(record.key)
        targets = result.closest
        held = 0
        if self._among_closest(record.key, targets):
            targets = targets[: self.k - 1]
            try:
                self.storage.put(record)
                held += 1
            except DHTError as exc:
                log.info("not storing our own record locally: {why}", why=exc)
        outcomes = await settle_all([self.protocol.call_store(c, record) for c in targets])
        for contact, (ok, failure) in zip(targets, outcomes, strict=True):
            if ok:
                held += 1
            else:
                log.info("{peer} did not store: {why}", peer=contact, why=failure.value)
        return held

    async def _get(self, key: bytes) -> dict[NodeID, SignedRecord]:
        result = await self._lookup(key, value_quorum=self.value_quorum)
        found = dict(result.records)
        merge_records(found, list(self.storage.get(key).values()))
        now = self.clock.seconds()
        return {subkey: r for subkey, r in found.items() if r.expiration > now}

    async def _republish(self) -> int:
        now = self.clock.seconds()
        for key in [key for key, r in self._owned.items() if r.expiration <= now]:
            del self._owned[key]
        records = list(self._owned.values())
        outcomes = await settle_all([self._run(self._publish(r)) for r in records])
        return sum(1 for ok, _ in outcomes if ok)

    async def _refresh(self) -> int:
        stale = self.table.stale_buckets(self.clock.seconds(), self.refresh_interval)
        targets = [bucket.random_id(self._rng) for bucket in stale]
        await settle_all([self._run(self._lookup(t)) for t in targets])
        return len(targets)

    async def _lookup(self, target: bytes, value_quorum: int | None = None) -> LookupResult:
        self.table.touch(target, self.clock.seconds())
        if value_quorum is None:
            query = self.protocol.call_find_node
        else:
            query = self.protocol.call_find_value
        lookup = IterativeLookup(
            target,
            self.table.closest(target),
            lambda contact, stats: query(contact, target, stats),
            self.node_id,
            self.k,
            self.alpha,
            value_quorum,
        )
        result = await lookup.run()
        self.last_lookup = result
        return result

    def _among_closest(self, key: bytes, closest: list[Contact]) -> bool:
        if len(closest) < self.k:
            return True
        return distance(self.node_id, key) < distance(closest[self.k - 1].node_id, key)

    def _sweep(self) -> Deferred[int]:
        return succeed(self.storage.sweep())

    # --- bookkeeping -----------------------------------------------------------

    def _run(self, work: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Wrap a coroutine in a Deferred that ``stop`` cancels."""
        if self._stopped:
            work.close()
            return fail(DHTError("this DHT node has stopped"))
        d = Deferred.fromCoroutine(work)
        if not d.called:
            self._running.add(d)
            d.addBoth(_forget_from, self._running, d)
        return d

    def _start_loop(self, job: Callable[[], Deferred[Any]], interval: float) -> LoopingCall:
        def tick() -> Deferred[Any]:
            return job().addErrback(_log_unless_cancelled, "DHT periodic job failed")

        loop = LoopingCall(tick)
        loop.clock = self.clock
        done = loop.start(interval, now=False)
        done.addErrback(_log_unless_cancelled, "DHT periodic loop ended")
        return loop


def _log_unless_cancelled(failure: Failure, what: str) -> None:
    if not failure.check(CancelledError):
        log.failure(what, failure)


def _forget_from(result: object, running: set[Deferred], d: Deferred) -> object:
    running.discard(d)
    return result
