"""The worker's DHT announcements: one record per block, refreshed, offline on stop."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from meshnode.inference.records import BlockSpan, ServerInfo
from meshnode.worker.announce import Announcer


class FakeDHT:
    def __init__(self):
        self.stores: list[tuple[bytes, dict, float]] = []

    def store(self, key, value, expiration):
        self.stores.append((key, value, expiration))
        return succeed(1)


def make(clock, dht, free):
    def info(state):
        return ServerInfo("127.0.0.1:1", BlockSpan(3, 6), state, 50.0, free[0], "float32", "fp")

    return Announcer(
        dht, clock, BlockSpan(3, 6), lambda b: bytes([b]) * 32, info, ttl=60, interval=20
    )


def test_announces_each_block_then_refreshes_then_offline():
    """When started, then each block is stored; every interval again with fresh info;
    and on stop, offline, expiring after the online records even at the same instant."""
    clock, dht, free = Clock(), FakeDHT(), [100]
    announcer = make(clock, dht, free)
    announcer.start()
    assert [k[0] for k, _, _ in dht.stores] == [3, 4, 5]
    assert all(exp == 60 for _, _, exp in dht.stores)
    free[0] = 40
    clock.advance(20)
    assert len(dht.stores) == 6 and dht.stores[-1][1]["cache_tokens"] == 40
    assert dht.stores[-1][2] == 80
    announcer.stop()
    assert [v["state"] for _, v, _ in dht.stores[-3:]] == ["offline"] * 3
    # the DHT keeps the record that expires last: offline must replace the online one
    assert all(exp > 80 for _, _, exp in dht.stores[-3:])
    clock.advance(100)
    assert len(dht.stores) == 9


def test_refresh_now_announces_early_only_while_running():
    """When something routing reads changed (a new peer measured), then refresh_now stores
    the records at once while the announcer runs, and does nothing before start or after
    stop."""
    clock, dht, free = Clock(), FakeDHT(), [100]
    announcer = make(clock, dht, free)
    announcer.refresh_now()
    assert dht.stores == []
    announcer.start()
    free[0] = 70
    clock.advance(5)
    announcer.refresh_now()
    assert len(dht.stores) == 6 and dht.stores[-1][1]["cache_tokens"] == 70
    announcer.stop()
    announcer.refresh_now()
    assert len(dht.stores) == 9
