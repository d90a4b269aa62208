"""``meshnode bootstrap`` as a real process: prints its pinned address, lets others
join, exits cleanly on SIGTERM."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from meshnode.dht.network import DHTNode, block_key
from meshnode.identity import Identity, PeerAddress
from meshnode.wire.endpoint import Endpoint

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STEP_TIMEOUT = 20.0

pytestmark = pytest.mark.timeout(120)


def reactor():
    from twisted.internet import reactor

    return reactor


def within(deferred: Deferred) -> Deferred:
    return deferred.addTimeout(STEP_TIMEOUT, reactor())


def start_bootstrap(*extra: str) -> tuple[subprocess.Popen, PeerAddress]:
    """A ``meshnode bootstrap`` process and the address it printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "meshnode", "bootstrap", "--host", "127.0.0.1", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = read_line(process, START_TIMEOUT)
    return process, PeerAddress.parse(line)


def read_line(process: subprocess.Popen, timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=deadline - time.monotonic()):
            line = process.stdout.readline()
            if line:
                return line.strip()
            break
    process.kill()
    raise AssertionError(f"no address printed; stderr: {process.stderr.read()}")


def terminate(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_nodes_join_a_bootstrap_process_and_share_records(tmp_path: Path) -> None:
    """When two bootstrap processes run (the second joining the first by host:port
    only), then an in-process node joins the second, stores a record that another
    in-process node finds, and both processes exit with 0 on SIGTERM; a data dir
    keeps the node id across restarts."""
    first, first_address = start_bootstrap("--data-dir", str(tmp_path / "seed"))
    processes = [first]
    endpoints: list[Endpoint] = []
    nodes: list[DHTNode] = []
    try:
        unpinned = f"127.0.0.1:{first_address.port}"
        second, second_address = start_bootstrap("--bootstrap", unpinned)
        processes.append(second)
        assert first_address.node_id is not None and second_address.node_id is not None
        for _ in range(2):
            endpoint = Endpoint(reactor(), Identity.ephemeral())
            await within(endpoint.listen("127.0.0.1"))
            endpoints.append(endpoint)
            node = DHTNode(endpoint, reactor(), reactor())
            nodes.append(node)
            await within(node.bootstrap([second_address]))
        key = block_key("command-test", 0)
        held = await within(nodes[0].store(key, {"hello": 1}, reactor().seconds() + 60))
        assert held == 4
        found = await within(nodes[1].get(key))
        assert found[nodes[0].node_id].value == {"hello": 1}
    finally:
        for node in nodes:
            await within(node.stop())
        for endpoint in endpoints:
            await within(endpoint.close())
        codes = [terminate(p) for p in processes]
    assert codes == [0, 0]
    again, again_address = start_bootstrap("--data-dir", str(tmp_path / "seed"))
    assert terminate(again) == 0
    assert again_address.node_id == first_address.node_id


@pytest.mark.slow
def test_a_taken_port_is_an_error() -> None:
    """When the port is already taken, then the command reports it and exits non-zero."""
    first, address = start_bootstrap()
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        taken = subprocess.run(
            [sys.executable, "-m", "meshnode", "bootstrap", "--port", str(address.port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=START_TIMEOUT,
        )
    finally:
        terminate(first)
    assert taken.returncode == 2  # a usage error, as argparse gives
    assert "error" in taken.stderr and taken.stdout == ""
