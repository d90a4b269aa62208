"""A private swarm of real processes: bootstrap and two workers of the tiny model, all members.

Members generate what local generation does; an outsider worker and an outsider
client are refused with ``not_a_member`` and never show up in routes or in
``meshnode status``; a member revoked (``meshnode swarm revoke`` + SIGHUP) is
refused after the nodes reload the list.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted

from meshnode.client.generate import GenerationOptions
from meshnode.errors import DHTError, MeshError, RemoteError
from meshnode.swarm.keys import create_swarm
from tests.mesh.mesh_helpers import prompts, with_timeout

pytestmark = pytest.mark.slow
NEW_TOKENS = 8
SPANS = ("0:3", "3:6")


def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture(scope="module")
def swarm_mesh(tiny_checkpoint, tmp_path_factory):
    from meshnode.testing.processes import LocalMesh

    root = tmp_path_factory.mktemp("swarm-mesh")
    create_swarm(root / "swarm")
    mesh = LocalMesh(str(tiny_checkpoint), root=root / "nodes", swarm=root / "swarm")
    try:
        mesh.start_bootstrap()
        mesh.start_workers(SPANS)
    except BaseException:
        mesh.stop()
        raise
    yield mesh
    mesh.stop()


async def started_client(mesh, model, name: str, member: bool = True):
    from meshnode.client.api import MeshClient

    options = {}
    if member:
        data_dir = mesh.root / name
        mesh.admit(data_dir)
        options = {"swarm": mesh.swarm / "swarm.pub", "data_dir": data_dir}
    client = MeshClient(reactor(), [mesh.join_address], model, **options)
    await with_timeout(client.start(), reactor(), 120)
    return client


async def generate(client, ids):
    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    await with_timeout(client.wait_for_route(60.0), reactor(), 90)
    result = await with_timeout(client.generate_ids(ids, options), reactor())
    return list(result.token_ids), result


def member_workers(mesh) -> list:
    """The mesh's workers that started (outsiders never do)."""
    return [w for w in mesh.workers() if w.address is not None and w.alive()]


def member_worker_ids(mesh) -> set[str]:
    return {w.address.node_id.hex() for w in member_workers(mesh)}


@pytest_twisted.ensureDeferred
async def test_members_generate_as_local(swarm_mesh, tiny_checkpoint, tiny_local):
    """When a member client generates through member workers, then the tokens equal local
    greedy generation and the route goes through member workers only."""
    client = await started_client(swarm_mesh, str(tiny_checkpoint), "member-client")
    try:
        ids = prompts(1, 128, seed=21)[0]
        local = list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
        tokens, result = await generate(client, ids)
        assert tokens == local
        assert {hop["worker"] for hop in result.route} <= member_worker_ids(swarm_mesh)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_outsider_client_is_refused(swarm_mesh, tiny_checkpoint):
    """When a client without membership joins, then the bootstrap node refuses it with
    not_a_member, and so does a worker it dials directly."""
    from meshnode.client.api import MeshClient
    from meshnode.identity import Identity
    from meshnode.inference import messages
    from meshnode.wire.endpoint import Endpoint

    client = MeshClient(reactor(), [swarm_mesh.join_address], str(tiny_checkpoint))
    try:
        with pytest.raises(DHTError, match="not_a_member"):
            await with_timeout(client.start(), reactor(), 120)
    finally:
        await client.close()
    outsider = Endpoint(reactor(), Identity.ephemeral(), {})
    try:
        worker = member_workers(swarm_mesh)[0].address
        with pytest.raises(RemoteError) as refused:
            await with_timeout(outsider.request(worker, messages.build_info()), reactor())
        assert refused.value.code == "not_a_member"
    finally:
        await outsider.close()


def test_outsider_worker_is_refused_and_absent_from_status(swarm_mesh, tiny_checkpoint):
    """When a worker without membership tries to join, then it fails to start saying
    not_a_member, and ``meshnode status --swarm`` lists exactly the member workers."""
    outsider = swarm_mesh.start_worker("0:6", wait=False, member=False)
    outsider.process.wait(120)
    assert "not_a_member" in outsider.log_tail(200)
    member_dir = swarm_mesh.root / "status-client"
    swarm_mesh.admit(member_dir)
    command = [sys.executable, "-m", "meshnode", "status", "--bootstrap",
               str(swarm_mesh.join_address), "--model", str(tiny_checkpoint),
               "--swarm", str(swarm_mesh.swarm / "swarm.pub"), "--data-dir", str(member_dir),
               "--json"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    listed = {row["worker"] for row in report["workers"]}
    assert listed == member_worker_ids(swarm_mesh)
    assert outsider.data_dir.joinpath("node_key.pem").exists()
    from meshnode.identity import Identity

    assert Identity.load_or_create(outsider.data_dir).node_id.hex() not in listed


def test_generate_command_of_a_member(swarm_mesh, tiny_checkpoint, tiny_local):
    """When ``meshnode generate --swarm --data-dir`` runs as a member, then it prints the
    tokens local greedy generation gives (verified at the command's default rate)."""
    member_dir = swarm_mesh.root / "cli-client"
    swarm_mesh.admit(member_dir)
    ids = prompts(1, 128, seed=23)[0]
    command = [sys.executable, "-m", "meshnode", "generate", "--bootstrap",
               str(swarm_mesh.join_address), "--model", str(tiny_checkpoint),
               "--swarm", str(swarm_mesh.swarm / "swarm.pub"), "--data-dir", str(member_dir),
               "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", str(NEW_TOKENS),
               "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    assert done.returncode == 0, done.stderr
    local = list(tiny_local.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS).token_ids)
    assert json.loads(done.stdout.strip().splitlines()[-1])["token_ids"] == local


async def wait_for_log(node, text: str, timeout: float = 30.0) -> None:
    from twisted.internet import task

    for _ in range(int(timeout / 0.1)):
        if text in node.log_tail(400):
            return
        await task.deferLater(reactor(), 0.1, lambda: None)
    raise AssertionError(f"{node.name} never logged {text!r}:\n{node.log_tail()}")


@pytest_twisted.ensureDeferred
async def test_revoked_member_is_refused_after_reload(swarm_mesh, tiny_checkpoint):
    """When a member that generated fine is revoked and the nodes get SIGHUP, then once they
    have reloaded the list its requests fail with not_a_member and it cannot generate."""
    from meshnode.inference import messages
    from meshnode.swarm.revocation import REVOKED_FILE_NAME, append_revoked

    client = await started_client(swarm_mesh, str(tiny_checkpoint), "revoked-client")
    try:
        ids = prompts(1, 128, seed=22)[0]
        await generate(client, ids)
        append_revoked(swarm_mesh.swarm / REVOKED_FILE_NAME, client.identity.node_id, "test")
        nodes = [swarm_mesh.bootstrap, *member_workers(swarm_mesh)]
        for node in nodes:
            node.signal(signal.SIGHUP)
        for node in nodes:
            await wait_for_log(node, "revocation list: 1 node(s)")
        worker = member_workers(swarm_mesh)[0].address
        with pytest.raises(RemoteError) as refused:
            await with_timeout(client.endpoint.request(worker, messages.build_info()), reactor())
        assert refused.value.code == "not_a_member" and "revoked" in refused.value.message
        with pytest.raises(MeshError):
            await with_timeout(
                client.generate_ids(ids, GenerationOptions(max_new_tokens=NEW_TOKENS)),
                reactor(), 120)
    finally:
        await client.close()
