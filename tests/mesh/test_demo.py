"""``meshnode demo`` as a user runs it: an answer with Paris, and no process left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

#: seconds the whole demo may take (four processes start, compile, answer, stop)
DEMO_TIMEOUT = 400


@pytest.mark.slow
def test_demo_answers_paris_and_leaves_nothing_running():
    """When the demo runs to the end, then it prints an answer containing Paris and every
    process it started is gone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    demo = psutil.Popen(
        [sys.executable, "-m", "meshnode", "demo", "--max-new-tokens", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen: set[int] = set()
    deadline = time.monotonic() + DEMO_TIMEOUT
    while demo.poll() is None and time.monotonic() < deadline:
        try:
            seen.update(child.pid for child in demo.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)  # sampling the process tree while the demo runs, not waiting on it
    try:
        stdout, stderr = demo.communicate(timeout=5)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, stderr[-3000:]
    assert "Paris" in stdout
    assert "route" in stderr and "tok/s" in stderr
    assert len(seen) >= 4, f"expected a bootstrap node and 3 workers, saw {len(seen)} children"
    leftover = [
        pid
        for pid in seen
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert leftover == []
