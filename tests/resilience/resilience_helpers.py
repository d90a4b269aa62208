"""Helpers of the resilience tests: real meshes, bounded polling, clients, references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnode.client.routing.route import RouteHop
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState
from meshnode.testing.processes import LocalMesh, NodeFailed, NodeProcess

#: seconds any awaited Deferred of a resilience test may take before the test fails
DEFERRED_TIMEOUT = 120.0
#: seconds between two checks of a polled condition
POLL_INTERVAL = 0.05


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def start_mesh(
    model: str, spans: list[str], root: Path, extra: list[str] | None = None
) -> LocalMesh:
    """A bootstrap node and one worker per span, started in parallel."""
    mesh = LocalMesh(model, root=root)
    try:
        mesh.start_bootstrap()
        mesh.start_workers(spans, extra)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def with_timeout(d: Any, seconds: float = DEFERRED_TIMEOUT) -> Any:
    """Every Deferred (or coroutine) a test awaits gets a bound."""
    import inspect

    from twisted.internet.defer import Deferred

    if inspect.iscoroutine(d):
        d = Deferred.fromCoroutine(d)
    return d.addTimeout(seconds, reactor())


async def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Yield to the reactor until ``condition()`` holds; AssertionError after ``timeout``."""
    from twisted.internet.task import deferLater

    deadline = reactor().seconds() + timeout
    while not condition():
        assert reactor().seconds() < deadline, f"not within {timeout:g} s: {what}"
        await deferLater(reactor(), POLL_INTERVAL, lambda: None)


def is_ready(node: NodeProcess) -> bool:
    """Whether ``node`` has reported its address (NodeFailed if it died)."""
    if node.address is not None:
        return True
    try:
        node.wait_ready(timeout=1e-3)  # one look at its address file and log
    except NodeFailed:
        if not node.alive():
            raise
        return False
    return True


def make_client(mesh: LocalMesh, model: str, step_timeout: float, route_wait: float = 60.0):
    """A started MeshClient joined to ``mesh``, with bounded steps and route waits."""
    import pytest_twisted

    from meshnode.client.api import MeshClient
    from meshnode.client.recovery import RecoveryOptions

    client = MeshClient(reactor(), [mesh.join_address], model, step_timeout=step_timeout)
    client.recovery_options = RecoveryOptions(route_wait=route_wait)
    pytest_twisted.blockon(client.start().addTimeout(DEFERRED_TIMEOUT, reactor()))
    return client


def pinned_hop(address: Any, worker_span: BlockSpan, used: BlockSpan, model: str) -> RouteHop:
    """A route hop through the worker at ``address`` (serving ``worker_span``) over ``used``,
    chosen by the test instead of the router."""
    info = ServerInfo(str(address), worker_span, WorkerState.ONLINE, 1.0, 1 << 20, "float32", model)
    return RouteHop(address.node_id, info, used)
