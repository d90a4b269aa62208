"""The routing table: k-buckets over the 256-bit id space, with no I/O.

Follows Maymounkov and Mazieres, "Kademlia: A Peer-to-peer Information System
Based on the XOR Metric" (IPTPS 2002), section 2.2 and 4.2:

- a bucket holds at most ``k`` contacts, least recently seen first;
- a full bucket whose range covers our own id splits in two; any other full
  bucket keeps its old contacts (old nodes tend to stay up) and parks the
  newcomer in a bounded replacement cache. ``add`` then returns the bucket's
  least recently seen contact: the caller pings it and either ``add``s it again
  (it answered: it moves to the tail) or ``remove``s it (a replacement takes
  its place);
- a bucket with no lookup in its range for a while is stale and gets
  refreshed by a lookup of a random id inside it.

The table never talks to the network and never reads a clock: callers pass
``now``.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Iterable

from meshnode.dht.node import ID_BITS, Contact, distance, id_to_int, int_to_id
from meshnode.identity import NodeID

K = 20
"""Bucket size and replication factor."""

REPLACEMENT_CACHE_SIZE = K
"""Newcomers remembered per full bucket, most recent first to be promoted."""


class KBucket:
    """Contacts whose ids fall in ``[lower, upper)``, least recently seen first."""

    def __init__(self, lower: int, upper: int, k: int, now: float) -> None:
        self.lower = lower
        self.upper = upper
        self.k = k
        self.contacts: OrderedDict[NodeID, Contact] = OrderedDict()
        self.replacements: OrderedDict[NodeID, Contact] = OrderedDict()
        self.last_touched = now

    def covers(self, node_id: NodeID) -> bool:
        return self.lower <= id_to_int(node_id) < self.upper

    @property
    def is_full(self) -> bool:
        return len(self.contacts) >= self.k

    @property
    def oldest(self) -> Contact:
        return next(iter(self.contacts.values()))

    def split(self) -> tuple[KBucket, KBucket]:
        """Two halves of this bucket, sharing its contacts and replacements."""
        middle = (self.lower + self.upper) // 2
        low = KBucket(self.lower, middle, self.k, self.last_touched)
        high = KBucket(middle, self.upper, self.k, self.last_touched)
        for node_id, contact in self.contacts.items():
            (low if id_to_int(node_id) < middle else high).contacts[node_id] = contact
        for node_id, contact in self.replacements.items():
            (low if id_to_int(node_id) < middle else high).replacements[node_id] = contact
        return low, high

    def random_id(self, rng: random.Random) -> NodeID:
        """A random id inside this bucket's range (the target of its refresh)."""
        return int_to_id(rng.randrange(self.lower, self.upper))

    def __len__(self) -> int:
        return len(self.contacts)


class RoutingTable:
    """The k-buckets of one node, split around its own id."""

    def __init__(self, own_id: NodeID, k: int = K, now: float = 0.0) -> None:
        self.own_id = own_id
        self.k = k
        self.buckets: list[KBucket] = [KBucket(0, 2**ID_BITS, k, now)]

    def bucket_for(self, node_id: NodeID) -> KBucket:
        value = id_to_int(node_id)
        for bucket in self.buckets:
            if bucket.lower <= value < bucket.upper:
                return bucket
        raise ValueError("id outside the id space")

    def add(self, contact: Contact, now: float) -> Contact | None:
        """Record that ``contact`` was seen alive.

        Returns ``None`` when the contact is in the table afterwards, or the
        least recently seen contact of its full bucket, which the caller must
        ping (the newcomer waits in the replacement cache meanwhile).
        """
        if contact.node_id == self.own_id:
            return None
        bucket = self.bucket_for(contact.node_id)
        bucket.last_touched = now
        if contact.node_id in bucket.contacts:
            del bucket.contacts[contact.node_id]
            bucket.contacts[contact.node_id] = contact
            return None
        if not bucket.is_full:
            bucket.replacements.pop(contact.node_id, None)
            bucket.contacts[contact.node_id] = contact
            return None
        if bucket.covers(self.own_id) and bucket.upper - bucket.lower > 1:
            self._split(bucket)
            return self.add(contact, now)
        bucket.replacements.pop(contact.node_id, None)
        bucket.replacements[contact.node_id] = contact
        while len(bucket.replacements) > REPLACEMENT_CACHE_SIZE:
            bucket.replacements.popitem(last=False)
        return bucket.oldest

    def remove(self, node_id: NodeID) -> None:
        """Forget a dead contact; the most recent replacement takes its place."""
        bucket = self.bucket_for(node_id)
        bucket.replacements.pop(node_id, None)
        if bucket.contacts.pop(node_id, None) is not None and bucket.replacements:
            promoted_id, promoted = bucket.replacements.popitem(last=True)
            bucket.contacts[promoted_id] = promoted

    def get(self, node_id: NodeID) -> Contact | None:
        return self.bucket_for(node_id).contacts.get(node_id)

    def closest(
        self, target: bytes, count: int | None = None, exclude: Iterable[NodeID] = ()
    ) -> list[Contact]:
        """The ``count`` (default ``k``) known contacts nearest to ``target``, nearest first."""
        excluded = set(exclude)
        candidates = (c for c in self.contacts() if c.node_id not in excluded)
        return heapq.nsmallest(
            self.k if count is None else count,
            candidates,
            key=lambda c: distance(c.node_id, target),
        )

    def touch(self, target: bytes, now: float) -> None:
        """Note a lookup of ``target``: its bucket is not stale."""
        self.bucket_for(target).last_touched = now

    def stale_buckets(self, now: float, max_age: float) -> list[KBucket]:
        """Buckets with no lookup or new contact for ``max_age`` seconds."""
        return [b for b in self.buckets if now - b.last_touched >= max_age]

    def contacts(self) -> list[Contact]:
        return [c for bucket in self.buckets for c in bucket.contacts.values()]

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, bytes) and self.get(node_id) is not None

    def _split(self, bucket: KBucket) -> None:
        index = self.buckets.index(bucket)
        self.buckets[index : index + 1] = bucket.split()
