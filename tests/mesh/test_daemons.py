"""``twistd meshnode`` as a real daemon: no ``-n``, a pidfile and a logfile, as the docs show.

The bootstrap node and two workers fork and detach (twistd's daemon mode);
generation goes through them; each stops on SIGTERM to the pid in its pidfile,
which twistd then removes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from meshnode.testing.processes import LocalMesh
from tests.mesh.mesh_helpers import prompts

PROCESS_TIMEOUT = 180
#: seconds a daemon may take to exit after SIGTERM
STOP_BOUND = 30.0


@pytest.mark.slow
def test_daemons_serve_and_stop_on_sigterm(tiny_checkpoint, tiny_local, tmp_path):
    """When a bootstrap node and two workers run as twistd daemons, then generation through
    them equals local generation, and SIGTERM to each pidfile's pid stops it within 30 s and
    removes its pidfile."""
    with LocalMesh(str(tiny_checkpoint), root=tmp_path, daemon=True) as mesh:
        mesh.start_bootstrap()
        mesh.start_workers(["0:3", "3:6"])
        for node in mesh.nodes:
            assert node.process.poll() == 0, "the launcher exits once the daemon runs"
            assert node.daemon_pid() != node.process.pid
            assert node.alive()
        worker_log = mesh.workers()[0].log_path.read_text()
        assert "os.fork() was called" not in worker_log
        for phase in ("open model", "load span 0:3", "compile", "join DHT", "announce"):
            assert f"meshnode worker: {phase}: " in worker_log

        ids = prompts(1, 128, seed=5)[0]
        done = subprocess.run(
            [sys.executable, "-m", "meshnode", "generate", "--model", str(tiny_checkpoint),
             "--bootstrap", str(mesh.join_address), "--prompt-ids", ",".join(map(str, ids)),
             "--max-new-tokens", "8", "--json"],
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        local = tiny_local.generate(prompt_ids=ids, max_new_tokens=8)
        assert json.loads(done.stdout)["token_ids"] == list(local.token_ids)

        for node in reversed(mesh.nodes):
            pid = node.daemon_pid()
            node.signal(signal.SIGTERM)
            assert node.wait_exit(STOP_BOUND), f"{node.name} (pid {pid}) still runs"
            assert not node.pid_path.exists(), f"{node.name} left its pidfile"


MAKE_SERVICE = """
import os, sys
from meshnode import tap
options = tap.Options()
options.parseOptions(sys.argv[1:])
before = len(os.listdir("/proc/self/task"))  # numpy's BLAS may hold a thread: fork-safe
service = tap.makeService(options)
print(len(os.listdir("/proc/self/task")) - before, "jax" in sys.modules, bool(service.running))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["worker", "bootstrap"])
def test_make_service_starts_no_thread(tiny_checkpoint, tmp_path, kind):
    """When twistd builds a worker or a bootstrap service (before it forks), then no thread
    is started and JAX is not even imported."""
    argv = ["--data-dir", str(tmp_path / kind)]
    if kind == "worker":
        argv += ["--model", str(tiny_checkpoint), "--blocks", "0:3"]
    done = subprocess.run([sys.executable, "-c", MAKE_SERVICE, kind, *argv],
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "False", "False"]
