"""The iterative lookup of Kademlia, in rounds of alpha parallel requests.

Maymounkov and Mazieres, "Kademlia: A Peer-to-peer Information System Based
on the XOR Metric" (IPTPS 2002), section 2.3: the initiator picks the alpha
contacts nearest the target from its own table and asks them, in parallel,
for the nodes they know nearest the target; each round it asks alpha more of
the k nearest it has heard of and not yet asked. When a round brings no
contact nearer than the nearest already seen, the next round asks all of the
k nearest not yet asked. The lookup ends when the k nearest contacts seen have
all answered (or failed: failed ones drop out and the next nearest move up).

A value lookup (FIND_VALUE) runs the same rounds but also gathers the records
each peer holds for the key, and stops early once ``value_quorum`` peers have
answered with records: a key holds one record per writer, so one answer may
miss a writer another has.

The lookup knows nothing of the network: ``query(contact, stats)`` returns a
Deferred of ``QueryAnswer`` (the protocol validated its records) and fails for
a dead or misbehaving peer. Rounds, requests and bytes are counted in
``LookupStats`` for the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList

from meshnode.dht.node import Contact, distance
from meshnode.dht.records import SignedRecord
from meshnode.identity import NodeID

ALPHA = 3
"""Parallel requests per round."""


@dataclass
class LookupStats:
    """What one lookup cost."""

    rounds: int = 0
    requests: int = 0
    failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class QueryAnswer:
    """One peer's answer: contacts it knows near the target, and its records (if any)."""

    contacts: list[Contact]
    records: list[SignedRecord] = field(default_factory=list)


@dataclass
class LookupResult:
    """The k nearest contacts that answered (nearest first) and the records found."""

    closest: list[Contact]
    records: dict[NodeID, SignedRecord]
    stats: LookupStats


Query = Callable[[Contact, LookupStats], "Deferred[QueryAnswer]"]


async def settle_all(deferreds: list[Deferred[Any]]) -> list[tuple[bool, Any]]:
    """Wait for every Deferred: ``(True, result)`` or ``(False, failure)`` each.

    Raises ``CancelledError`` when one was cancelled (the caller is being
    stopped): a plain ``DeferredList`` would report it as one more failure and
    let the work go on.
    """
    outcomes = await DeferredList(deferreds, consumeErrors=True)
    if any(not ok and outcome.check(CancelledError) for ok, outcome in outcomes):
        raise CancelledError()
    return outcomes


def merge_records(held: dict[NodeID, SignedRecord], records: list[SignedRecord]) -> None:
    """Keep, per sub-key, the record that expires last."""
    for record in records:
        current = held.get(record.subkey)
        if current is None or record.expiration > current.expiration:
            held[record.subkey] = record


class IterativeLookup:
    """One lookup of ``target`` starting from ``seeds`` (our nearest known contacts)."""

    def __init__(
        self,
        target: bytes,
        seeds: list[Contact],
        query: Query,
        own_id: NodeID,
        k: int,
        alpha: int = ALPHA,
        value_quorum: int | None = None,
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self.value_quorum = value_quorum
        self._query = query
        self._own_id = own_id
        self._seen: dict[NodeID, Contact] = {c.node_id: c for c in seeds if c.node_id != own_id}
        self._asked: set[NodeID] = set()
        self._answered: dict[NodeID, Contact] = {}
        self._failed: set[NodeID] = set()
        self._holders = 0
        self.records: dict[NodeID, SignedRecord] = {}
        self.stats = LookupStats()

    def run(self) -> Deferred[LookupResult]:
        """Run the rounds; cancelling the Deferred cancels the requests in flight."""
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> LookupResult:
        nearest_seen = self._nearest_distance()
        widen = False
        while not self._value_found():
            batch = self._next_batch(widen)
            if not batch:
                break
            self.stats.rounds += 1
            await self._ask(batch)
            now_nearest = self._nearest_distance()
            widen = now_nearest >= nearest_seen
            nearest_seen = min(nearest_seen, now_nearest)
        closest = sorted(self._answered.values(), key=self._distance)[: self.k]
        return LookupResult(closest, self.records, self.stats)

    def _next_batch(self, widen: bool) -> list[Contact]:
        candidates = [c for c in self._seen.values() if c.node_id not in self._failed]
        nearest = sorted(candidates, key=self._distance)[: self.k]
        unasked = [c for c in nearest if c.node_id not in self._asked]
        return unasked if widen else unasked[: self.alpha]

    async def _ask(self, batch: list[Contact]) -> None:
        self._asked.update(c.node_id for c in batch)
        self.stats.requests += len(batch)
        outcomes = await settle_all([self._query(contact, self.stats) for contact in batch])
        for contact, (ok, answer) in zip(batch, outcomes, strict=True):
            if not ok:
                self.stats.failures += 1
                self._failed.add(contact.node_id)
                continue
            self._answered[contact.node_id] = contact
            for found in answer.contacts:
                if found.node_id != self._own_id and found.node_id not in self._seen:
                    self._seen[found.node_id] = found
            if answer.records:
                self._holders += 1
                merge_records(self.records, answer.records)

    def _value_found(self) -> bool:
        return self.value_quorum is not None and self._holders >= self.value_quorum

    def _nearest_distance(self) -> int:
        live = [c for c in self._seen.values() if c.node_id not in self._failed]
        return min((self._distance(c) for c in live), default=2**256)

    def _distance(self, contact: Contact) -> int:
        return distance(contact.node_id, self.target)
