"""``LocalMesh``: real bootstrap and worker processes on loopback, for tests and the demo.

Every node is a ``twistd -n meshnode ...`` process with its own folder (data
dir, pidfile, logfile), listening on an ephemeral port of 127.0.0.1. Its pinned
address is read from ``<data dir>/address`` (workers write it when ready) or
from the first ``host:port#<id>`` in its output or its log. Children run the same meshnode
as this process (``PYTHONPATH`` points at it). ``NodeProcess.signal`` lets
chaos tests SIGKILL or SIGSTOP a node; ``LocalMesh.stop`` stops every node
(SIGTERM, then SIGKILL after a bound) and is safe to call twice.

``start_bootstrap(relay_delay_ms=D)`` and ``start_worker(..., relay_delay_ms=D)``
put the node behind its own ``meshnode.testing.relay`` process (every byte
``D`` ms late each way) and start it with ``--announce-address`` of the
relay: peers reach it only through the relay (``NodeProcess.relay``; its
``stats()`` count the connections it relayed).

``LocalMesh(..., swarm=DIR)`` makes a private swarm's mesh: each node is
admitted (``DIR/swarm.key`` signs its membership) and started with
``--swarm DIR/swarm.pub``, unless started with ``member=False`` (an outsider).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import meshnode
from meshnode.errors import MeshError
from meshnode.identity import PeerAddress
from meshnode.model.compile_cache import MIN_CACHED_COMPILE_SECONDS, compile_cache_dir

ADDRESS_PATTERN = re.compile(r"(?<![\w.])((?:\d{1,3}\.){3}\d{1,3}:\d+#[0-9a-f]{64})")
#: seconds a node may take to start (a worker loads and compiles its blocks)
START_TIMEOUT = 180.0
#: seconds between SIGTERM and SIGKILL
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
#: what a worker logs once its background step programs are compiled (meshnode.worker.service)
PRECOMPILED = "precompiled"
#: seconds ``wait_precompiled`` waits at most
PRECOMPILE_TIMEOUT = 900.0
#: seconds a relay process may take to listen
RELAY_START_TIMEOUT = 30.0


class NodeFailed(MeshError):
    """A node process exited or did not become ready in time."""

    code = "node_failed"


@dataclass
class RelayProcess:
    """A ``python -m meshnode.testing.relay`` process in front of one node."""

    folder: Path
    process: subprocess.Popen
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict:
        """``connections`` accepted, ``open`` now, ``bytes_to_target``, ``bytes_from_target``."""
        return json.loads((self.folder / "stats.json").read_text())

    def set_delay(self, delay_ms: float, timeout: float = RELAY_START_TIMEOUT) -> None:
        """Change the delay of every byte from now on; returns once the relay applies it."""
        path = self.folder / "delay_ms"
        partial = path.with_name("delay_ms.partial")
        partial.write_text(f"{delay_ms}\n")
        os.replace(partial, path)
        deadline = time.monotonic() + timeout
        while abs(self.stats()["delay_ms"] - delay_ms) > 1e-6:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise NodeFailed(f"relay {self.folder.name} did not take delay {delay_ms} ms")
            time.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class NodeProcess:
    """One ``twistd`` process and its folder."""

    name: str
    folder: Path
    process: subprocess.Popen
    address: PeerAddress | None = None
    args: list[str] = field(default_factory=list)
    relay: RelayProcess | None = None
    """The relay peers reach this node through (``relay_delay_ms``), if any."""
    daemon: bool = False
    """Started without ``-n``: ``process`` is the launcher, which exits once twistd forked;
    the daemon's pid is in the pidfile."""

    @property
    def pid(self) -> int:
        if self.daemon:
            pid = self.daemon_pid()
            if pid is None:
                raise NodeFailed(f"{self.name}: no pid in {self.pid_path}")
            return pid
        return self.process.pid

    @property
    def pid_path(self) -> Path:
        return self.folder / "twistd.pid"

    def daemon_pid(self) -> int | None:
        """The pid twistd wrote to the pidfile (None while there is none)."""
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "twistd.log"

    def alive(self) -> bool:
        if self.daemon:
            pid = self.daemon_pid()
            return pid is not None and _pid_alive(pid) or self.process.poll() is None
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` (e.g. SIGKILL, SIGSTOP, SIGCONT) if the process is still there."""
        if self.daemon:
            pid = self.daemon_pid()
            if pid is not None and _pid_alive(pid):
                os.kill(pid, signum)
        elif self.alive():
            self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> bool:
        """Poll until the process (the daemon, for a daemon) is gone; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(POLL_INTERVAL)
        return not self.alive()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the twistd log and of the process's own output."""
        tails = []
        for path in (self.log_path, self.folder / "stdout.log"):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tails.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails) or "(no log)"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> PeerAddress:
        """Poll until the node reports its address; ``NodeFailed`` if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            address = self._read_address()
            if address is not None:
                self.address = address
                return address
            if not self.alive():
                raise NodeFailed(
                    f"{self.name} exited with {self.process.poll()}:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)
        raise NodeFailed(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (and SIGCONT, in case it was stopped), then SIGKILL after ``timeout``."""
        if self.daemon:
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)
            if not self.wait_exit(timeout):
                self.signal(signal.SIGKILL)
                self.wait_exit(timeout)
            return self.process.wait()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def _read_address(self) -> PeerAddress | None:
        for path in (self.data_dir / "address", self.folder / "stdout.log", self.log_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            match = ADDRESS_PATTERN.search(text)
            if match:
                return PeerAddress.parse(match.group(1))
        return None


class LocalMesh:
    """Bootstrap and worker processes under one temporary folder; a context manager."""

    #: whether workers compile their step programs in the background (``--no-precompile``
    #: when not), unless a mesh says otherwise
    precompile = True

    def __init__(
        self,
        model: str,
        root: Path | None = None,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        swarm: Path | None = None,
        daemon: bool = False,
        precompile: bool | None = None,
    ):
        """``daemon``: start nodes as real twistd daemons (no ``-n``; they fork and detach).
        ``precompile=False`` starts workers with ``--no-precompile``; None takes the class's
        ``precompile`` (the test suite turns it off: see tests/conftest.py)."""
        self.model = model
        self.precompile = type(self).precompile if precompile is None else precompile
        self.swarm = swarm
        self.daemon = daemon
        self._owned_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="meshnode-mesh-"))
        self.python = python
        self.nodes: list[NodeProcess] = []
        self.bootstrap: NodeProcess | None = None
        self._env = _child_env(extra_env)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_bootstrap(self, relay_delay_ms: float | None = None) -> NodeProcess:
        """A DHT-only node (behind a relay of that delay when given); waits until it reports
        its address."""
        args = ["bootstrap", "--host", "127.0.0.1", "--port", "0"]
        node = self._spawn("bootstrap", args, member=True, relay_delay_ms=relay_delay_ms)
        node.wait_ready()
        self.bootstrap = node
        return node

    def start_worker(
        self, blocks: str | None = None, extra: list[str] | None = None, wait: bool = True,
        member: bool = True,
        liar: tuple[float, float] | None = None,
        relay_delay_ms: float | None = None,
    ) -> NodeProcess:
        """A worker that joins through ``join_address`` (none for the first of a mesh
        without a bootstrap node); ``blocks`` is ``"A:B"`` or None (choose); in a
        swarm's mesh, ``member=False`` starts an outsider; ``liar=(noise, inflate)``
        starts a worker whose outputs are noisy and whose throughput is inflated
        (``meshnode.testing.liar``); ``relay_delay_ms`` puts it behind a relay."""
        args = ["worker", "--model", self.model, "--host", "127.0.0.1", "--port", "0"]
        if self.join_address is not None:
            args += ["--bootstrap", str(self.join_address)]
        if blocks is not None:
            args += ["--blocks", blocks]
        if not self.precompile:
            args.append("--no-precompile")
        preamble = ""
        if liar is not None:
            preamble = f"import meshnode.testing.liar as l; l.install({liar[0]!r}, {liar[1]!r}); "
        node = self._spawn(f"worker-{len(self.nodes)}", args + list(extra or []), member,
                           preamble, relay_delay_ms)
        if wait:
            node.wait_ready()
        return node

    def start_workers(
        self, spans: Sequence[str | None], extra: list[str] | None = None,
        relay_delay_ms: float | None = None,
    ) -> list[NodeProcess]:
        """One worker per span, started side by side; returns once every one is ready."""
        nodes = [
            self.start_worker(span, extra, wait=False, relay_delay_ms=relay_delay_ms)
            for span in spans
        ]
        for node in nodes:
            node.wait_ready()
        return nodes

    @property
    def join_address(self) -> PeerAddress | None:
        """Where new nodes join: the bootstrap node, else the first ready node."""
        for node in ([self.bootstrap] if self.bootstrap else []) + self.nodes:
            if node.address is not None:
                return node.address
        return None

    def workers(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n is not self.bootstrap]

    def wait_precompiled(self, timeout: float = PRECOMPILE_TIMEOUT) -> bool:
        """Wait until every worker has said its background step programs are compiled
        (benchmarks: until then they compete for the cores); True when all have, False at
        ``timeout``. A worker started with ``--no-precompile`` has nothing to wait for."""
        pending = [n for n in self.workers() if "--no-precompile" not in n.args]
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if PRECOMPILED not in n.log_tail(400)]
            if pending:
                time.sleep(10 * POLL_INTERVAL)
        return not pending

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every node: SIGTERM to all at once, then SIGKILL whoever is left."""
        for node in self.nodes:
            node.signal(signal.SIGTERM)
            node.signal(signal.SIGCONT)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.daemon:
                node.stop(max(0.0, deadline - time.monotonic()))
                continue
            try:
                node.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        for node in self.nodes:
            if node.relay is not None:
                node.relay.stop()

    def start_relay(self, name: str, delay_ms: float, target_file: Path) -> RelayProcess:
        """A relay process forwarding to the ``host:port`` in ``target_file`` (read once it
        exists); returns once it listens."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            self.python, "-m", "meshnode.testing.relay", "--delay-ms", str(delay_ms),
            "--target-file", str(target_file), "--port-file", str(folder / "port"),
            "--stats", str(folder / "stats.json"), "--delay-file", str(folder / "delay_ms"),
        ]
        with open(folder / "stdout.log", "wb") as stdout:
            process = subprocess.Popen(command, cwd=folder, env=self._env,
                                       stdin=subprocess.DEVNULL, stdout=stdout,
                                       stderr=subprocess.STDOUT)
        deadline = time.monotonic() + RELAY_START_TIMEOUT
        while not (folder / "port").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise NodeFailed(f"relay {name} did not start: "
                                 f"{(folder / 'stdout.log').read_text(errors='replace')}")
            time.sleep(POLL_INTERVAL)
        return RelayProcess(folder, process, int((folder / "port").read_text()))

    def admit(self, data_dir: Path, days: float = 1.0) -> None:
        """Write a membership of this mesh's swarm into ``data_dir`` (its key created if
        missing)."""
        from meshnode.identity import Identity
        from meshnode.swarm.keys import load_swarm_key
        from meshnode.swarm.membership import issue_membership, write_membership

        node_id = Identity.load_or_create(data_dir).node_id
        now = time.time()
        certificate = issue_membership(load_swarm_key(self.swarm), node_id, now, now + days * 86400)
        write_membership(data_dir, certificate)

    def _spawn(
        self, name: str, args: list[str], member: bool = True, preamble: str = "",
        relay_delay_ms: float | None = None,
    ) -> NodeProcess:
        folder = self.root / name
        (folder / "data").mkdir(parents=True, exist_ok=True)
        args = args + ["--data-dir", str(folder / "data")]
        relay = None
        if relay_delay_ms is not None:
            relay = self.start_relay(f"relay-{name}", relay_delay_ms, folder / "data" / "listening")
            args += ["--announce-address", relay.address]
        if self.swarm is not None and member:
            self.admit(folder / "data")
            args += ["--swarm", str(self.swarm / "swarm.pub")]
        command = [
            self.python,
            "-c",
            preamble + "from twisted.scripts.twistd import run; run()",
            *([] if self.daemon else ["-n"]),
            f"--pidfile={folder / 'twistd.pid'}",
            f"--logfile={folder / 'twistd.log'}",
            "meshnode",
            *args,
        ]
        with open(folder / "stdout.log", "wb") as stdout:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )
        node = NodeProcess(name, folder, process, args=args, relay=relay, daemon=self.daemon)
        self.nodes.append(node)
        return node


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """Our environment, with this meshnode first on the path, JAX on the CPU by default
    and the shared compilation cache."""
    env = dict(os.environ)
    source_root = str(Path(meshnode.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", compile_cache_dir())
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_CACHED_COMPILE_SECONDS))
    env.update(extra or {})
    return env
