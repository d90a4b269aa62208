"""A worker without --blocks picks the blocks the mesh serves least."""

from __future__ import annotations

from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.worker.span_choice import block_coverage, choose_span


def info(start: int, end: int, model: str = "m", online: bool = True, n: int = 0) -> ServerInfo:
    return ServerInfo(
        address=f"127.0.0.1:{4000 + n}",
        span=BlockSpan(start, end),
        state=WorkerState.ONLINE if online else WorkerState.OFFLINE,
        throughput=10.0,
        cache_tokens=100,
        dtype="float32",
        model=model,
    )


def per_block(*infos: ServerInfo) -> dict[int, list[ServerInfo]]:
    records: dict[int, list[ServerInfo]] = {}
    for item in infos:
        for block in item.span.blocks():
            records.setdefault(block, []).append(item)
    return records


def test_empty_mesh_starts_at_zero():
    """When no worker serves anything, then the first window is chosen."""
    assert choose_span({}, 30, 10, "m") == BlockSpan(0, 10)


def test_fills_the_gap():
    """When blocks 0-9 and 20-29 are served, then a new worker takes 10-19."""
    records = per_block(info(0, 10, n=1), info(20, 30, n=2))
    assert choose_span(records, 30, 10, "m") == BlockSpan(10, 20)


def test_ignores_other_models_and_offline():
    """When records are offline or of another model, then they do not count as coverage."""
    records = per_block(
        info(0, 10, model="other", n=1), info(10, 20, online=False, n=2), info(20, 30, n=3)
    )
    assert block_coverage(records, 30, "m")[:20] == [0] * 20
    assert choose_span(records, 30, 10, "m") == BlockSpan(0, 10)


def test_prefers_least_total_among_equal_minimum():
    """When every window has an unserved block, then the least served in total wins."""
    records = per_block(info(0, 12, n=1), info(0, 5, n=2))
    assert choose_span(records, 30, 10, "m") == BlockSpan(12, 22)
