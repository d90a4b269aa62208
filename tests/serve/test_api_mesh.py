"""The OpenAI-compatible API through ``meshnode serve`` over real worker processes, spoken to
by the real ``openai`` package: answers equal ``meshnode generate``'s, streamed or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY, MODEL_NAME
from tests.serve.serve_helpers import ServeProcess, metrics_url, scrape, wait_until

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
PROMPTS = ("Hello there", "What is the capital of France?", "abc", "Tell me a story",
           "1 2 3 4", "The quick brown fox", "zzz", "Once upon a time")


def meshnode_generate(mesh, checkpoint, prompt: str, chat: bool,
                      max_new_tokens: int = NEW_TOKENS) -> dict:
    """What ``meshnode generate --json`` answers for a greedy prompt through ``mesh``."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    command = [sys.executable, "-m", "meshnode", "generate", "--bootstrap",
               str(mesh.join_address), "--model", str(checkpoint), "--prompt", prompt,
               "--max-new-tokens", str(max_new_tokens), "--json"] + (["--chat"] if chat else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def chat(client, prompt: str, stream: bool = False, **extra):
    """A greedy chat completion of ``prompt`` (``extra`` overrides)."""
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], stream=stream,
        **{"temperature": 0, "max_tokens": NEW_TOKENS, **extra})


def streamed_text(chunks, chat_api: bool = True) -> tuple[str, list]:
    pieces, chunks = [], list(chunks)
    for chunk in chunks:
        for choice in chunk.choices:
            text = choice.delta.content if chat_api else choice.text
            pieces.append(text or "")
    return "".join(pieces), chunks


def finish_reason_of(expected: dict) -> str:
    return "stop" if expected["stop_reason"] == "eos" else "length"


def test_models_lists_the_served_model(openai_client):
    """When a client lists the models, then the served model is there under its name."""
    assert next(m.id for m in openai_client.models.list().data) == MODEL_NAME


def test_chat_completion_equals_meshnode_generate(openai_client, api_mesh, chat_checkpoint):
    """When a greedy chat completion is asked, streamed or not, then its text is the one
    ``meshnode generate --chat`` gives, with usage counts and finish_reason."""
    expected = meshnode_generate(api_mesh, chat_checkpoint, PROMPTS[1], chat=True)
    whole = chat(openai_client, PROMPTS[1])
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == finish_reason_of(expected)
    assert whole.usage.completion_tokens == len(expected["token_ids"])
    assert whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    text, chunks = streamed_text(chat(openai_client, PROMPTS[1], stream=True,
                                      stream_options={"include_usage": True}))
    assert text == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == finish_reason_of(expected)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        expected["token_ids"])


def test_completion_equals_meshnode_generate(openai_client, api_mesh, chat_checkpoint):
    """When a greedy text completion is asked, streamed or not, then its text is the one
    ``meshnode generate`` gives for the same prompt."""
    expected = meshnode_generate(api_mesh, chat_checkpoint, PROMPTS[0], chat=False)
    whole = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], temperature=0,
                                             max_tokens=NEW_TOKENS)
    assert whole.choices[0].text == expected["text"]
    assert whole.choices[0].finish_reason == finish_reason_of(expected)
    stream = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0],
                                              temperature=0, max_tokens=NEW_TOKENS, stream=True)
    text, _ = streamed_text(stream, chat_api=False)
    assert text == expected["text"]


def test_max_tokens_ends_with_length(openai_client):
    """When max_completion_tokens is small, then exactly that many tokens come, with "length"
    (unless EOS came first)."""
    answer = chat(openai_client, PROMPTS[3], max_completion_tokens=3)
    assert answer.usage.completion_tokens <= 3
    if answer.usage.completion_tokens == 3:
        assert answer.choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text(openai_client):
    """When a stop string appears in the text, then the answer ends just before it, with
    finish_reason "stop", streamed or not."""
    full = chat(openai_client, PROMPTS[5]).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = full[: full.find(stop)]
    whole = chat(openai_client, PROMPTS[5], stop=[stop])
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (cut, "stop")
    text, chunks = streamed_text(chat(openai_client, PROMPTS[5], stream=True, stop=stop))
    assert text == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_eight_concurrent_streams(openai_client):
    """When 8 streams run at once, then each one's text is the one it gets alone."""
    alone = [chat(openai_client, p).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(
            lambda p: streamed_text(chat(openai_client, p, stream=True))[0], PROMPTS))
    assert together == alone


def test_bad_parameters_are_400_naming_them(openai_client):
    """When a parameter is bad, then the answer is 400 and the error names the parameter."""
    import openai

    for extra, param in (({"temperature": 5}, "temperature"), ({"n": 2}, "n"),
                         ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as raised:
            chat(openai_client, "hi", **extra)
        assert raised.value.status_code == 400
        assert raised.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=MODEL_NAME,
                                              messages=[{"role": "robot", "content": "x"}])
    assert raised.value.body["param"] == "messages[0].role"


def test_too_long_for_the_workers_is_400_on_max_tokens(openai_client):
    """When prompt plus max_tokens is longer than the workers accept, then it is a 400 that
    names max_tokens."""
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        chat(openai_client, "hi", max_tokens=5000)
    assert raised.value.body["param"] == "max_tokens"


def test_an_unknown_path_is_a_json_404(api_server):
    """When a /v1 path does not exist, then the answer is an OpenAI error object, 404."""
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as raised:
        api_server.get("/v1/engines")
    assert raised.value.code == 404
    assert json.loads(raised.value.read())["error"]["code"] == "not_found"


def test_missing_or_wrong_key_is_401(api_server):
    """When --api-key is set and a request has no key or a wrong one, then it is a 401."""
    import openai

    for key in ("wrong", ""):
        client = openai.OpenAI(base_url=api_server.url + "/v1", api_key=key or "x",
                               max_retries=0, default_headers={} if key else
                               {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()
        assert raised.value.status_code == 401
        assert raised.value.body["code"] == "invalid_api_key"
        client.close()


def test_the_key_also_guards_the_swarm_data_and_metrics(api_server):
    """When --api-key is set, then /api/swarm and /metrics answer 401 without the key or with
    a wrong one, and their data with the right one."""
    import urllib.error

    for path in ("/api/swarm", "/metrics"):
        for key in (None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as raised:
                api_server.get(path, key)
            assert raised.value.code == 401
            assert json.loads(raised.value.read())["error"]["code"] == "invalid_api_key"
    assert "models" in api_server.get_json("/api/swarm", API_KEY)
    assert b"meshnode_api_requests_total" in api_server.get("/metrics", API_KEY)


def test_an_oversized_body_is_413_and_the_server_goes_on(api_server, openai_client):
    """When a request announces a body over --max-body, then the answer is 413 with an
    OpenAI error object before the body is sent, and the server still answers others."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(api_server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Authorization", f"Bearer {API_KEY}")
    connection.putheader("Content-Length", str(64 << 20))
    connection.endheaders()  # no body at all: the answer must not wait for it
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    assert [m.id for m in openai_client.models.list().data][0] == MODEL_NAME


def test_unknown_model_is_404(openai_client):
    """When a request names a model that is not served, then it is a 404."""
    import openai

    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.chat.completions.create(model="gpt-4",
                                              messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 404
    assert raised.value.body["code"] == "model_not_found"


def test_uncovered_model_is_503_with_the_reason(api_mesh, tmp_path):
    """When no worker serves the model's blocks, then a completion is a 503 that says so."""
    import openai

    from tests.serve.serve_helpers import write_tiny_chat_checkpoint

    other = write_tiny_chat_checkpoint(tmp_path / "other", seed=7)  # another fingerprint
    server = ServeProcess(tmp_path / "serve", ["--bootstrap", str(api_mesh.join_address),
                                               "--model", str(other), "--model-name", "other"])
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model="other", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
        assert raised.value.status_code == 503
        assert "blocks 0:6" in raised.value.body["message"]
        with pytest.raises(openai.InternalServerError) as raised:
            list(client.chat.completions.create(model="other", max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
        assert raised.value.status_code == 503
        client.close()
    finally:
        server.stop()


def test_disconnect_mid_stream_frees_the_sessions(openai_client, api_server, api_mesh):
    """When a client drops a stream mid-way, then the server cancels it and every worker's
    session is closed at once (long before the idle timeout), as the workers' metrics show."""
    urls = [metrics_url(node) for node in api_mesh.workers()]

    def sessions() -> list:
        return [scrape(url)[("meshnode_worker_sessions", ())] for url in urls]

    wait_until(lambda: sessions() and all(s == 0 for s in sessions()), 60, "idle before")
    stream = chat(openai_client, PROMPTS[6], stream=True, max_tokens=400)
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    wait_until(lambda: any(s > 0 for s in sessions()), 30, "sessions open mid-stream")
    stream.close()
    wait_until(lambda: all(s == 0 for s in sessions()), 30, "sessions closed")
    metrics = api_server.get("/metrics", API_KEY).decode()
    assert 'meshnode_api_requests_total{endpoint="chat.completions",status="499"}' in metrics


def test_no_capacity_is_503_with_the_reason(chat_checkpoint, tmp_path):
    """When the only worker has no cache room for the session, then a completion is a 503
    whose message says which blocks nobody can serve (the client bans a worker that refuses
    for want of room, then finds no route; it does not pass the worker's own reason on)."""
    import openai

    from meshnode.testing.processes import LocalMesh

    with LocalMesh(str(chat_checkpoint), root=tmp_path / "mesh") as mesh:
        mesh.start_bootstrap()
        mesh.start_worker("0:6", extra=["--cache-tokens", "64"])
        server = ServeProcess(tmp_path / "serve", ["--bootstrap", str(mesh.join_address),
                                                   "--model", str(chat_checkpoint),
                                                   "--model-name", "small"])
        try:
            server.wait_ready()
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.InternalServerError) as raised:
                client.completions.create(model="small", prompt="hello", max_tokens=300)
            assert raised.value.status_code == 503
            assert "blocks 0:6" in raised.value.body["message"], raised.value.body
            assert raised.value.body["code"] == "swarm_unavailable"
            client.close()
        finally:
            server.stop()
