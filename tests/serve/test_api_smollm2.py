"""The real model through the API: SmolLM2's own chat template, over two worker processes,
answers the capital question as ``meshnode generate --chat`` does, streamed and not."""

from __future__ import annotations

import pytest

from tests.serve.serve_helpers import ServeProcess
from tests.serve.test_api_mesh import meshnode_generate, streamed_text

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_serve(tmp_path_factory):
    from meshnode.testing.processes import LocalMesh

    root = tmp_path_factory.mktemp("smollm2-api")
    with LocalMesh("smollm2", root=root / "mesh") as mesh:
        mesh.start_bootstrap()
        mesh.start_workers(("0:15", "15:30"))
        server = ServeProcess(root / "serve", ["--bootstrap", str(mesh.join_address),
                                               "--model", "smollm2"])
        try:
            server.wait_ready()
            yield mesh, server
        finally:
            server.stop()


def test_smollm2_chat_through_the_api_equals_meshnode_generate(smollm2_serve):
    """When SmolLM2 is asked the capital of France through the API, then it says Paris, with
    the very text of ``meshnode generate --chat``, streamed or not."""
    import openai

    mesh, server = smollm2_serve
    expected = meshnode_generate(mesh, "smollm2", QUESTION, chat=True, max_new_tokens=16)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                           timeout=300)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_tokens=16)
    assert "Paris" in whole.choices[0].message.content
    assert whole.choices[0].message.content == expected["text"]
    text, _ = streamed_text(client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=16, stream=True))
    assert text == expected["text"]
    client.close()
