"""The record store: replacement by newer records, limits, clock-driven expiry."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from meshnode.dht.records import sign_record
from meshnode.dht.storage import RecordStore
from meshnode.errors import InvalidRecord, StorageFull
from meshnode.identity import Identity

KEY = bytes(range(32))
OTHER_KEY = bytes(reversed(range(32)))


@pytest.fixture(scope="module")
def writers() -> list[Identity]:
    return [Identity.ephemeral() for _ in range(4)]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000.0)
    return clock


def test_newer_record_of_a_subkey_replaces_the_older(clock: Clock, writers) -> None:
    """When a writer stores a later-expiring record, then it replaces its earlier one;
    an earlier-expiring one is ignored."""
    store = RecordStore(clock)
    alice = writers[0]
    assert store.put(sign_record(alice, KEY, {"v": 1}, 1100.0))
    assert store.put(sign_record(alice, KEY, {"v": 2}, 1200.0))
    assert not store.put(sign_record(alice, KEY, {"v": 3}, 1150.0))
    assert not store.put(sign_record(alice, KEY, {"v": 4}, 1200.0))
    assert store.get(KEY)[alice.node_id].value == {"v": 2}
    assert len(store) == 1


def test_subkeys_of_one_key_coexist(clock: Clock, writers) -> None:
    """When several writers store under one key, then each keeps its own entry."""
    store = RecordStore(clock)
    for i, writer in enumerate(writers):
        store.put(sign_record(writer, KEY, {"v": i}, 1100.0))
    held = store.get(KEY)
    assert set(held) == {w.node_id for w in writers}
    assert store.get(OTHER_KEY) == {}


def test_invalid_records_are_not_stored(clock: Clock, writers) -> None:
    """When a record fails validation, then put raises and nothing is kept."""
    store = RecordStore(clock)
    with pytest.raises(InvalidRecord):
        store.put(sign_record(writers[0], KEY, {"v": 1}, 999.0))
    with pytest.raises(InvalidRecord):
        store.put(sign_record(writers[0], KEY, {"v": 1}, 1000.0 + 7200.0))
    assert len(store) == 0


def test_per_key_limit_refuses_new_subkeys_but_allows_renewal(clock: Clock, writers) -> None:
    """When a key holds its limit of sub-keys, then a new writer is refused while a
    present writer may still renew, and room frees up once a record expires."""
    store = RecordStore(clock, max_subkeys_per_key=2)
    store.put(sign_record(writers[0], KEY, {"v": 0}, 1050.0))
    store.put(sign_record(writers[1], KEY, {"v": 1}, 1100.0))
    with pytest.raises(StorageFull):
        store.put(sign_record(writers[2], KEY, {"v": 2}, 1100.0))
    assert store.put(sign_record(writers[1], KEY, {"v": 1}, 1200.0))
    assert store.put(sign_record(writers[2], OTHER_KEY, {"v": 2}, 1100.0))
    clock.advance(60.0)
    assert store.put(sign_record(writers[2], KEY, {"v": 2}, 1200.0))
    assert set(store.get(KEY)) == {writers[1].node_id, writers[2].node_id}


def test_overall_limit_refuses_new_records(clock: Clock, writers) -> None:
    """When the node holds its overall limit, then new records under any key are refused."""
    store = RecordStore(clock, max_records=3)
    for i, key in enumerate([KEY, OTHER_KEY, bytes(32)]):
        store.put(sign_record(writers[i], key, {"v": i}, 1100.0))
    with pytest.raises(StorageFull):
        store.put(sign_record(writers[3], KEY, {"v": 3}, 1100.0))
    assert len(store) == 3


def test_expired_records_vanish_and_are_swept(clock: Clock, writers) -> None:
    """When the clock passes a record's expiry, then get no longer returns it and the
    next sweep frees it."""
    store = RecordStore(clock)
    store.put(sign_record(writers[0], KEY, {"v": 0}, 1010.0))
    store.put(sign_record(writers[1], KEY, {"v": 1}, 1100.0))
    clock.advance(10.0)
    assert set(store.get(KEY)) == {writers[1].node_id}
    assert store.sweep() == 1
    assert len(store) == 1
    clock.advance(90.0)
    assert store.sweep() == 1
    assert store.keys() == []
