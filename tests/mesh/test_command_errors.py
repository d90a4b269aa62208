"""What a user sees when things go wrong, through the ``meshnode`` command on real processes.

- every failure ends with the command's own exit status (2 for usage and
  connection errors), never a native crash;
- no route: the real reason (no worker accepts that many positions; no free
  cache now, retry later), said before any session is opened;
- ``meshnode status`` asks each worker and shows a dead one as unreachable;
- the only worker of a span dies mid-generation: a bounded wait for another,
  then a clear error, with what was generated kept.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from meshnode.testing.processes import LocalMesh
from tests.mesh.mesh_helpers import prompts

pytestmark = pytest.mark.slow

PROCESS_TIMEOUT = 180
#: the tiny model accepts at most this many positions (max_position_embeddings)
TINY_MAX_POSITIONS = 512
#: the cache budget of the second worker (blocks 3:6) of the errors mesh
SMALL_CACHE = 256
#: tokens the generation must have printed before its last worker of blocks 3:6 is killed
KILL_AFTER_TOKENS = 20
NATIVE_CRASH = ("terminate called", "FATAL", "Aborted", "core dumped", "Traceback")


def meshnode(*args: str, timeout: float = PROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshnode", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def closed_port() -> int:
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_clean_error(done: subprocess.CompletedProcess, command: str, says: str) -> None:
    """Exit status 2, one error line naming the command, no crash after it."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert f"meshnode {command}: " in done.stderr and says in done.stderr, done.stderr
    assert not any(mark in done.stderr for mark in NATIVE_CRASH), done.stderr[-2000:]


@pytest.fixture(scope="module")
def errors_mesh(tiny_checkpoint, tmp_path_factory):
    """A bootstrap node, blocks 0:3 and blocks 3:6 with a cache budget of 256 tokens."""
    mesh = LocalMesh(str(tiny_checkpoint), root=tmp_path_factory.mktemp("errors-mesh"))
    try:
        mesh.start_bootstrap()
        first = mesh.start_worker("0:3", wait=False)
        second = mesh.start_worker("3:6", ["--cache-tokens", str(SMALL_CACHE)], wait=False)
        first.wait_ready()
        second.wait_ready()
    except BaseException:
        mesh.stop()
        raise
    yield mesh
    mesh.stop()


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("generate", ["--prompt", "hi"]),
        ("generate", ["--prompt-ids", "1,2,3"]),
        ("status", []),
        ("worker", ["--blocks", "0:3"]),
    ],
)
def test_unreachable_bootstrap_is_exit_2_not_a_crash(tiny_checkpoint, command, extra):
    """When no bootstrap peer answers, then each command says so on one line and exits
    with 2, with no native crash (SIGABRT) after the message."""
    done = meshnode(command, "--model", str(tiny_checkpoint),
                    "--bootstrap", f"127.0.0.1:{closed_port()}", *extra)
    assert_clean_error(done, command, "no bootstrap peer answered")


def test_usage_errors_are_exit_2(tiny_checkpoint):
    """When a flag is wrong or a prompt is missing, then the exit status is 2."""
    assert meshnode("generate", "--no-such-flag").returncode == 2
    done = meshnode("generate", "--local", "--model", str(tiny_checkpoint))
    assert_clean_error(done, "generate", "give --prompt")


def test_too_long_a_session_names_the_length(errors_mesh, tiny_checkpoint):
    """When the session needs more positions than any worker accepts, then the error says
    how many it needs and the most any worker accepts, and the exit status is 2."""
    ids = prompts(1, 128, seed=3)[0]
    new_tokens = TINY_MAX_POSITIONS + 50
    done = meshnode("generate", "--model", str(tiny_checkpoint),
                    "--bootstrap", str(errors_mesh.join_address),
                    "--prompt-ids", ",".join(map(str, ids)),
                    "--max-new-tokens", str(new_tokens))
    assert_clean_error(
        done, "generate",
        f"the session needs {len(ids) + new_tokens} positions and no worker of blocks 0:6 "
        f"accepts more than {TINY_MAX_POSITIONS}",
    )


def test_no_free_cache_says_retry_later(errors_mesh, tiny_checkpoint):
    """When the only worker of blocks 3:6 has too little free cache for the session, then
    the error says that its workers have no free cache now and to retry later."""
    ids = prompts(1, 128, seed=4)[0]
    new_tokens = SMALL_CACHE + 10
    done = meshnode("generate", "--model", str(tiny_checkpoint),
                    "--bootstrap", str(errors_mesh.join_address),
                    "--prompt-ids", ",".join(map(str, ids)),
                    "--max-new-tokens", str(new_tokens))
    assert_clean_error(done, "generate", "the workers of blocks 3:6 have no free cache now")
    assert "retry later" in done.stderr


def test_status_shows_a_killed_worker_unreachable(errors_mesh, tiny_checkpoint):
    """When a worker is SIGKILLed, then `meshnode status` at once shows it unreachable (its
    records are still in the DHT) and counts none of its blocks as covered by it."""
    extra = errors_mesh.start_worker("0:6")
    extra_id = extra.address.node_id.hex()

    def status() -> tuple[int, dict]:
        done = meshnode("status", "--model", str(tiny_checkpoint),
                        "--bootstrap", str(errors_mesh.join_address), "--json")
        assert done.returncode in (0, 1), done.stderr[-2000:]
        return done.returncode, json.loads(done.stdout)

    code, before = status()
    row = next(r for r in before["workers"] if r["worker"] == extra_id)
    assert code == 0 and row["state"] == "online" and row["rtt_ms"] is not None
    assert all(extra_id in ids for ids in before["blocks"])

    extra.signal(signal.SIGKILL)
    extra.process.wait(30)
    code, after = status()
    row = next(r for r in after["workers"] if r["worker"] == extra_id)
    assert row["state"] == "unreachable" and row["rtt_ms"] is None
    assert not any(extra_id in ids for ids in after["blocks"])
    assert code == 0 and after["covered"], "the other two workers still cover every block"
    text = meshnode("status", "--model", str(tiny_checkpoint),
                    "--bootstrap", str(errors_mesh.join_address))
    assert f"{extra_id[:12]}" in text.stdout and "unreachable" in text.stdout


def test_last_worker_of_a_span_dies_mid_generation(tiny_checkpoint, tiny_local, tmp_path):
    """When the only worker of blocks 3:6 dies mid-generation, then `meshnode generate
    --recovery-wait 3` waits for another, then fails with exit 2 and an error naming the
    span and the wait; the tokens generated until then are on stdout (equal to local ones)."""
    ids = prompts(1, 128, seed=6)[0]
    new_tokens = 400
    with LocalMesh(str(tiny_checkpoint), root=tmp_path) as mesh:
        mesh.start_bootstrap()
        mesh.start_workers(["0:3", "3:6"])
        args = ["generate", "--model", str(tiny_checkpoint), "--bootstrap",
                str(mesh.join_address), "--prompt-ids", ",".join(map(str, ids)),
                "--max-new-tokens", str(new_tokens), "--recovery-wait", "3"]
        client = subprocess.Popen([sys.executable, "-m", "meshnode", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            printed = ""
            while printed.count(" ") < KILL_AFTER_TOKENS:  # ids stream as they come
                piece = client.stdout.read(1)
                assert piece, "the generation ended before the kill"
                printed += piece
            mesh.workers()[1].signal(signal.SIGKILL)
            # read() drains what the pipe's text buffer already holds (communicate would not)
            out, err = client.stdout.read(), client.stderr.read()
            client.wait(timeout=PROCESS_TIMEOUT)
        finally:
            if client.poll() is None:
                client.kill()
    done = subprocess.CompletedProcess(args, client.returncode, printed + out, err)
    assert_clean_error(done, "generate", "the worker of blocks 3:6 failed")
    assert "no other took them over within 3 s" in err
    got = [int(token) for token in done.stdout.split()]
    local = tiny_local.generate(prompt_ids=ids, max_new_tokens=new_tokens)
    assert KILL_AFTER_TOKENS <= len(got) < new_tokens
    assert got == list(local.token_ids[: len(got)])
    assert f"[interrupted after {len(got)} tokens]" in err


def test_recovery_wait_default_is_the_library_one():
    """When --recovery-wait is not given, then the wait is the library's ROUTE_WAIT."""
    from meshnode.client.recovery import ROUTE_WAIT
    from meshnode.commands import generate

    assert generate.ROUTE_WAIT == ROUTE_WAIT
