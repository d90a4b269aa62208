"""HTTP API fixtures: a tiny chat model served by worker processes, and ``meshnode serve``.

Never import the reactor at module level here (pytest-twisted installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.serve_helpers import ServeProcess, write_tiny_chat_checkpoint

API_KEY = "test-key"
MODEL_NAME = "tiny-chat"
#: the workers of the API mesh: two halves of the 6 blocks
SPANS = ("0:3", "3:6")


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat")


@pytest.fixture(scope="session")
def api_mesh(chat_checkpoint, tmp_path_factory):
    """A bootstrap node and two workers of the tiny chat model, each with a metrics port."""
    from meshnode.testing.processes import LocalMesh

    mesh = LocalMesh(str(chat_checkpoint), root=tmp_path_factory.mktemp("api-mesh"))
    try:
        mesh.start_bootstrap()
        mesh.start_workers(SPANS, extra=["--metrics-port", "0"])
    except BaseException:
        mesh.stop()
        raise
    yield mesh
    mesh.stop()


@pytest.fixture(scope="session")
def api_server(api_mesh, chat_checkpoint, tmp_path_factory):
    """``meshnode serve`` over the API mesh, with an API key and a short model name."""
    server = ServeProcess(tmp_path_factory.mktemp("serve"), [
        "--bootstrap", str(api_mesh.join_address), "--model", str(chat_checkpoint),
        "--api-key", API_KEY, "--model-name", MODEL_NAME,
    ])
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture()
def openai_client(api_server):
    import openai

    client = openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=120)
    yield client
    client.close()
