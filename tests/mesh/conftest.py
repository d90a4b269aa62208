"""Mesh fixtures: real worker processes on loopback, shared across tests (they are slow to start).

Never import the reactor at module level here (pytest-twisted installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mesh.mesh_helpers import write_tiny_checkpoint

#: the three workers of the SmolLM2 mesh
SMOLLM2_SPANS = ("0:10", "10:20", "20:30")
#: spans of the tiny mesh: one worker for all 6 blocks, two halves, three thirds
TINY_SPANS = ("0:6", "0:3", "3:6", "0:2", "2:4", "4:6")


def start_mesh(model: str, spans: tuple[str, ...], root: Path):
    """A bootstrap node and one worker per span, started in parallel."""
    from meshnode.testing.processes import LocalMesh

    mesh = LocalMesh(model, root=root)
    try:
        mesh.start_bootstrap()
        mesh.start_workers(spans)
    except BaseException:
        mesh.stop()
        raise
    return mesh


@pytest.fixture(scope="session", autouse=True)
def _compile_cache():
    """The client side shares the workers' persistent compilation cache."""
    from meshnode.model.compile_cache import enable_compile_cache

    enable_compile_cache()


@pytest.fixture(scope="session")
def smollm2_mesh(tmp_path_factory):
    """A bootstrap node and three SmolLM2 workers (blocks 0-9, 10-19, 20-29)."""
    mesh = start_mesh("smollm2", SMOLLM2_SPANS, tmp_path_factory.mktemp("smollm2-mesh"))
    yield mesh
    mesh.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_mesh(tiny_checkpoint, tmp_path_factory):
    """Six workers of the tiny model: all blocks, halves, thirds."""
    mesh = start_mesh(str(tiny_checkpoint), TINY_SPANS, tmp_path_factory.mktemp("tiny-mesh"))
    yield mesh
    mesh.stop()


@pytest.fixture(scope="session")
def smollm2_local():
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    return LocalModel.load(open_model("smollm2"))


@pytest.fixture(scope="session")
def tiny_local(tiny_checkpoint):
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    return LocalModel.load(open_model(str(tiny_checkpoint)))


def make_client(mesh, model: str):
    """A MeshClient joined to ``mesh``; closed by the caller's finalizer."""
    import pytest_twisted
    from twisted.internet import reactor

    from meshnode.client.api import MeshClient

    client = MeshClient(reactor, [mesh.join_address], model)
    pytest_twisted.blockon(client.start().addTimeout(120, reactor))
    return client


@pytest.fixture(scope="module")
def smollm2_client(smollm2_mesh):
    import pytest_twisted

    client = make_client(smollm2_mesh, "smollm2")
    yield client
    pytest_twisted.blockon(client.close())


@pytest.fixture(scope="module")
def tiny_client(tiny_mesh, tiny_checkpoint):
    import pytest_twisted

    client = make_client(tiny_mesh, str(tiny_checkpoint))
    yield client
    pytest_twisted.blockon(client.close())
