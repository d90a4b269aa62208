"""The routing table as a specification: splits, eviction, replacement, ordering."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.dht.node import ID_BITS, Contact, distance, id_to_int, int_to_id
from meshnode.dht.routing import K, RoutingTable

OWN_ID = bytes(32)


def contact(value: int) -> Contact:
    return Contact(int_to_id(value), "127.0.0.1", 1000 + value % 50000)


def high_half_contact(rng: random.Random) -> Contact:
    """A contact whose id differs from OWN_ID in the top bit (the far bucket)."""
    return contact(rng.randrange(2 ** (ID_BITS - 1), 2**ID_BITS))


def full_far_bucket(rng: random.Random) -> tuple[RoutingTable, list[Contact]]:
    table = RoutingTable(OWN_ID)
    members = [high_half_contact(rng) for _ in range(K)]
    for c in members:
        assert table.add(c, now=0.0) is None
    return table, members


def test_bucket_covering_own_id_splits_when_full() -> None:
    """When a bucket that covers our id overflows, then it splits and keeps everyone."""
    rng = random.Random(1)
    table = RoutingTable(OWN_ID)
    added = [contact(rng.randrange(2**ID_BITS)) for _ in range(3 * K)]
    for c in added:
        table.add(c, now=0.0)
    assert len(table.buckets) > 1
    for bucket in table.buckets:
        assert len(bucket) <= K
        assert all(bucket.covers(node_id) for node_id in bucket.contacts)
    # every contact near us is kept: only far buckets may have overflowed
    near = [c for c in added if distance(c.node_id, OWN_ID) < 2 ** (ID_BITS - 3)]
    assert all(c.node_id in table for c in near)
    ranges = sorted((b.lower, b.upper) for b in table.buckets)
    assert ranges[0][0] == 0 and ranges[-1][1] == 2**ID_BITS
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_full_far_bucket_asks_to_ping_its_oldest_and_keeps_it_when_alive() -> None:
    """When a far bucket is full, then add returns its oldest contact; if that one
    answers, it stays (moving to the tail) and the newcomer waits as a replacement."""
    rng = random.Random(2)
    table, members = full_far_bucket(rng)
    newcomer = high_half_contact(rng)
    to_ping = table.add(newcomer, now=1.0)
    assert to_ping == members[0]
    assert newcomer.node_id not in table
    assert table.add(members[0], now=2.0) is None  # the ping answered
    bucket = table.bucket_for(newcomer.node_id)
    assert list(bucket.contacts)[-1] == members[0].node_id
    assert newcomer.node_id not in table
    assert newcomer.node_id in bucket.replacements


def test_dead_oldest_is_replaced_by_the_newcomer() -> None:
    """When the oldest contact of a full bucket does not answer, then removing it
    promotes the most recent replacement."""
    rng = random.Random(3)
    table, members = full_far_bucket(rng)
    first, second = high_half_contact(rng), high_half_contact(rng)
    assert table.add(first, now=1.0) == members[0]
    assert table.add(second, now=1.0) == members[0]
    table.remove(members[0].node_id)  # the ping failed
    assert members[0].node_id not in table
    assert second.node_id in table  # most recent replacement first
    assert first.node_id not in table
    table.remove(members[1].node_id)
    assert first.node_id in table
    assert len(table) == K


def test_readding_a_contact_updates_its_address() -> None:
    """When a known node is seen at a new address, then the table keeps the new one."""
    table = RoutingTable(OWN_ID)
    old = contact(12345)
    table.add(old, now=0.0)
    moved = Contact(old.node_id, "10.0.0.2", 4242)
    table.add(moved, now=1.0)
    assert table.get(old.node_id) == moved
    assert len(table) == 1


def test_own_id_is_never_added() -> None:
    """When our own id is offered, then the table ignores it."""
    table = RoutingTable(OWN_ID)
    assert table.add(Contact(OWN_ID, "127.0.0.1", 1), now=0.0) is None
    assert len(table) == 0


@settings(max_examples=30, deadline=None)
@given(
    own=st.binary(min_size=32, max_size=32),
    target=st.binary(min_size=32, max_size=32),
    seed=st.integers(0, 2**32),
)
def test_closest_returns_the_k_nearest_known_in_xor_order(
    own: bytes, target: bytes, seed: int
) -> None:
    """When asked for the contacts closest to a target, then they come nearest first
    and no known contact outside the answer is nearer than one inside it."""
    rng = random.Random(seed)
    table = RoutingTable(own)
    for _ in range(120):
        table.add(contact(rng.randrange(2**ID_BITS)), now=0.0)
    known = sorted(table.contacts(), key=lambda c: distance(c.node_id, target))
    answer = table.closest(target)
    assert answer == known[:K]
    excluded = {c.node_id for c in answer[:5]}
    assert table.closest(target, count=3, exclude=excluded) == known[5:8]


def test_stale_buckets_and_refresh_targets() -> None:
    """When a bucket sees no lookup or newcomer for the refresh interval, then it
    is stale, and its refresh target lies inside its range."""
    rng = random.Random(5)
    table = RoutingTable(OWN_ID, now=0.0)
    for _ in range(3 * K):
        table.add(contact(rng.randrange(2**ID_BITS)), now=0.0)
    assert table.stale_buckets(now=100.0, max_age=3600.0) == []
    stale = table.stale_buckets(now=3600.0, max_age=3600.0)
    assert stale == table.buckets
    table.touch(stale[0].random_id(rng), now=3600.0)
    assert table.stale_buckets(now=3600.0, max_age=3600.0) == table.buckets[1:]
    for bucket in table.buckets:
        target = bucket.random_id(rng)
        assert bucket.lower <= id_to_int(target) < bucket.upper
