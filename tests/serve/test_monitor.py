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
