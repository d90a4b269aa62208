"""The monitor's snapshot as a specification: coverage counts only serving workers, gaps are
runs of uncovered blocks, and a worker that does not answer is unreachable."""

from __future__ import annotations

from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.serve.monitor import WorkerView, gaps, swarm_snapshot


def view(start: int, end: int, node: bytes, reachable: bool = True,
         state: WorkerState = WorkerState.ONLINE) -> WorkerView:
    info = ServerInfo(f"127.0.0.1:1#{node.hex()}", BlockSpan(start, end), state, 12.5, 900,
                      "float32", "fp")
    return WorkerView(node, info, reachable=reachable, rtt=0.002 if reachable else None,
                      sessions=1 if reachable else None, last_seen=10.0)


def test_gaps_are_runs_of_uncovered_blocks():
    """When blocks have no serving worker, then gaps lists each run as [start, end)."""
    assert gaps([1, 0, 0, 2, 0]) == [[1, 3], [4, 5]]
    assert gaps([1, 1]) == []


def test_only_serving_workers_cover_blocks():
    """When one worker is unreachable and one offline, then only the reachable online
    worker covers its blocks, and each row says its state."""
    snapshot = swarm_snapshot("m", 6, [
        view(0, 3, b"\x01"), view(3, 6, b"\x02", reachable=False),
        view(0, 6, b"\x03", state=WorkerState.OFFLINE),
    ], now=12.0, polled=11.0)
    model = snapshot["models"][0]
    assert model["coverage"] == [1, 1, 1, 0, 0, 0]
    assert model["gaps"] == [[3, 6]] and not model["complete"]
    assert [w["state"] for w in model["workers"]] == ["serving", "offline", "unreachable"]
    first = model["workers"][0]
    assert (first["rtt_ms"], first["sessions"], first["cache_tokens"]) == (2.0, 1, 900)
    assert first["last_seen_ago_s"] == 2.0 and snapshot["polled_ago_s"] == 1.0


class FakeClient:
    """Counts block record reads; one worker announced."""

    def __init__(self):
        from twisted.internet.defer import fail

        self.reads = 0
        self.source = type("S", (), {"config": type("C", (), {"num_layers": 6})()})()
        self.endpoint = type("E", (), {"request": lambda *a, **k: fail(OSError("down"))})()

    def block_records(self):
        from twisted.internet.defer import succeed

        self.reads += 1
        return succeed({0: {b"\x01": view(0, 6, b"\x01").info}})


def test_the_monitor_polls_only_while_watched():
    """When nobody asked for a snapshot lately, then the monitor does not poll the swarm;
    when one is asked, then it polls every interval for ``watch_time``, and a worker that
    does not answer its ping shows as unreachable."""
    from twisted.internet.task import Clock

    from meshnode.serve.monitor import SwarmMonitor

    clock, client = Clock(), FakeClient()
    monitor = SwarmMonitor(client, clock, "m", interval=2.0, watch_time=10.0)
    monitor.start()
    clock.advance(4.0)
    assert client.reads == 0
    monitor.snapshot()
    clock.advance(2.0)
    assert client.reads == 1
    worker = monitor.snapshot()["models"][0]["workers"][0]
    assert (worker["state"], worker["reachable"], worker["sessions"]) == ("unreachable", False,
                                                                          None)
    clock.advance(2.0)
    clock.advance(2.0)
    assert client.reads == 3
    for _ in range(10):
        clock.advance(2.0)
    assert client.reads == 6  # polls at 12, 14, 16; none after 16 = 6 + watch_time
    monitor.stop()
