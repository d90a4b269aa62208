"""The ``/v1`` resources in memory (twisted.web's ``DummyRequest``, a fake mesh client):
statuses, the event stream's framing, and a disconnect cancelling the generation."""

from __future__ import annotations

import json
from io import BytesIO

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from meshnode.serve.resources import Completions, Models, ServeContext
from tests.serve.test_completions import FakeClient

KEY = "k"


def context(client=None) -> ServeContext:
    return ServeContext(client or FakeClient("hello"), Clock(), ["m"], api_key=KEY)


def post(resource, body: dict, key: str | None = KEY) -> DummyRequest:
    request = DummyRequest([b""])
    request.method = b"POST"
    request.content = BytesIO(json.dumps(body).encode())
    if key is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {key}".encode()])
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def sample(ctx: ServeContext, name: str, **labels: str) -> float | None:
    if labels:
        labels = {"endpoint": "chat.completions", **labels}
    return ctx.metrics.registry.get_sample_value(name, labels)


def body_of(request) -> dict:
    return json.loads(b"".join(request.written))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_statuses_of_refusals():
    """When the key is missing or wrong, the model unknown or a field bad, then the answer
    is 401, 404 or 400 with an OpenAI error object, and the refusal is counted."""
    ctx = context()
    resource = Completions(ctx, chat=True)
    for request_body, key, status, code in (
        (CHAT, None, 401, "invalid_api_key"),
        (CHAT, "bad", 401, "invalid_api_key"),
        ({**CHAT, "model": "x"}, KEY, 404, "model_not_found"),
        ({**CHAT, "top_p": 2}, KEY, 400, "invalid_parameter"),
    ):
        request = post(resource, request_body, key)
        assert request.responseCode == status
        assert body_of(request)["error"]["code"] == code
    assert sample(ctx, "meshnode_api_requests_total", status="401") == 2
    models = DummyRequest([b""])
    assert Models(ctx).render(models) and models.responseCode == 401


def test_a_stream_is_events_then_done():
    """When a stream completes, then it is a role chunk, text chunks, a finish chunk, the
    usage chunk, and ``data: [DONE]``, as text/event-stream."""
    client = FakeClient("hello")
    request = post(Completions(context(client), chat=True),
                   {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    client.emit()
    assert request.finished
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
        b"text/event-stream")
    events = b"".join(request.written).decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_a_client_that_leaves_cancels_its_generation():
    """When the HTTP client goes away mid-stream, then the generation's Deferred is cancelled
    (which closes its mesh sessions), nothing more is written, and no stream stays open."""
    client = FakeClient("hello")
    ctx = context(client)
    request = post(Completions(ctx, chat=True), {**CHAT, "stream": True})
    client.on_token(ord("h"))
    written = len(request.written)
    request.processingFailed(Failure(ConnectionDone()))
    assert client.cancelled
    client.on_token(ord("e"))
    assert len(request.written) == written
    assert sample(ctx, "meshnode_api_open_streams") == 0
    assert sample(ctx, "meshnode_api_requests_total", status="499") == 1


def bounded_channel(max_body: int):
    """An HTTP channel of a site whose requests refuse bodies over ``max_body``, on a
    ``StringTransport``."""
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from meshnode.serve.bounded import bounded_requests

    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request):
            return b"got " + str(len(request.content.read())).encode()

    channel = Site(Echo(), requestFactory=bounded_requests(max_body)).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def post_raw(length_header: bytes, body: bytes) -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: h\r\n" + length_header + b"\r\n" + body


def test_a_body_within_the_limit_reaches_the_resource():
    """When a body is at most the limit, then the resource reads all of it."""
    channel, transport = bounded_channel(16)
    channel.dataReceived(post_raw(b"Content-Length: 16\r\n", b"x" * 16))
    assert transport.value().startswith(b"HTTP/1.1 200") and transport.value().endswith(b"got 16")


def test_a_content_length_over_the_limit_is_413_at_once():
    """When Content-Length is over the limit, then a 413 with an OpenAI error object goes
    out before any body byte arrives, and the connection is closed."""
    channel, transport = bounded_channel(16)
    channel.dataReceived(post_raw(b"Content-Length: 17\r\n", b""))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert transport.disconnecting


def test_a_chunked_body_is_refused_when_it_passes_the_limit():
    """When a chunked body's running total passes the limit, then it is refused with 413
    and what came after is not kept."""
    channel, transport = bounded_channel(16)
    chunks = b"a\r\n" + b"y" * 10 + b"\r\n" + b"a\r\n" + b"y" * 10 + b"\r\n0\r\n\r\n"
    channel.dataReceived(post_raw(b"Transfer-Encoding: chunked\r\n", chunks))
    assert transport.value().startswith(b"HTTP/1.1 413")
    assert b"got" not in transport.value()
    assert transport.disconnecting


def test_the_command_default_body_limit_is_the_servers():
    """The ``--max-body`` default is the server's own default."""
    from meshnode.commands import serve
    from meshnode.serve import bounded

    assert serve.DEFAULT_MAX_BODY == bounded.DEFAULT_MAX_BODY
