"""The ``twisted.web`` resources of ``/v1``: models, chat completions, completions.

Every request is handled on the reactor thread with no thread of its own: a
completion is a ``CompletionRun`` whose Deferred the resource waits on
(``NOT_DONE_YET``), and a streamed one writes each piece as an event when its
token arrives. A client that goes away cancels its run at once (which closes
its mesh sessions). Errors are OpenAI error objects (``schema.error_object``)
with the status their ``ApiError`` carries.
"""

from __future__ import annotations

import hmac
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from meshnode.errors import ApiError, Unauthorized, UnknownModel
from meshnode.serve import schema
from meshnode.serve.completions import CompletionOutcome, CompletionRun, api_error
from meshnode.serve.metrics import ServerMetrics
from meshnode.serve.sse import EventStream

#: status recorded for a request whose client went away before the answer (as nginx does)
CLIENT_CLOSED = 499

log = Logger()


@dataclass
class ServeContext:
    """What every resource needs: the mesh client, the clock, the metrics, the settings."""

    client: Any  # meshnode.client.api.MeshClient
    reactor: Any
    model_ids: list[str]
    api_key: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    monitor: Any = None  # meshnode.serve.monitor.SwarmMonitor

    def authorize(self, request: Any) -> None:
        if self.api_key is None:
            return
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("no API key: send Authorization: Bearer <key>")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise Unauthorized("wrong API key")

    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise UnknownModel(
                f"model {model!r} is not served here; this server serves: "
                + ", ".join(self.model_ids))


def write_json(request: Any, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode("utf-8")


def write_error(request: Any, error: ApiError) -> bytes:
    return write_json(request, error.status, schema.error_object(error))


class V1(Resource):
    """``/v1``: its children, and a JSON 404 for any other path."""

    def __init__(self, context: ServeContext):
        super().__init__()
        self.putChild(b"models", Models(context))
        self.putChild(b"completions", Completions(context, chat=False))
        chat = Resource()
        chat.putChild(b"completions", Completions(context, chat=True))
        self.putChild(b"chat", chat)

    def getChild(self, path: bytes, request: Any) -> Resource:
        return NotFound()


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        error = ApiError(f"no such endpoint: {request.method.decode()} {request.path.decode()}")
        error.status, error.kind, error.code = 404, "invalid_request_error", "not_found"
        return write_error(request, error)


class Models(Resource):
    """``GET /v1/models``."""

    isLeaf = True

    def __init__(self, context: ServeContext):
        super().__init__()
        self._context = context
        self._created = int(context.reactor.seconds())

    def render_GET(self, request: Any) -> bytes:
        try:
            self._context.authorize(request)
        except ApiError as exc:
            self._context.metrics.requests.labels("models", str(exc.status)).inc()
            return write_error(request, exc)
        self._context.metrics.requests.labels("models", "200").inc()
        return write_json(request, 200, schema.models_object(self._context.model_ids,
                                                              self._created))


class Completions(Resource):
    """``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""

    isLeaf = True

    def __init__(self, context: ServeContext, chat: bool):
        super().__init__()
        self._context = context
        self._chat = chat
        self._endpoint = "chat.completions" if chat else "completions"

    def render_POST(self, request: Any) -> bytes | int:
        context = self._context
        try:
            context.authorize(request)
            body = schema.decode_body(request.content.read())
            parse = schema.parse_chat_request if self._chat else schema.parse_completion_request
            parsed = parse(body)
            context.check_model(parsed.model)
        except ApiError as exc:
            self._count(exc.status)
            return write_error(request, exc)
        serve = self._stream if parsed.stream else self._whole
        done = Deferred.fromCoroutine(serve(request, parsed))
        done.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _whole(self, request: Any, parsed: schema.CompletionRequest) -> None:
        began = self._context.reactor.seconds()
        run = self._run(parsed, began)
        request.notifyFinish().addErrback(lambda _: run.cancel())
        try:
            outcome = await run.start()
        except CancelledError:
            self._count(CLIENT_CLOSED)
            return
        except ApiError as exc:
            self._answer(request, exc.status, schema.error_object(exc))
            return
        self._tokens(outcome)
        payload = schema.completion_object(
            parsed, _completion_id(self._chat), int(began), outcome.text, outcome.finish_reason,
            schema.usage_object(outcome.prompt_tokens, outcome.completion_tokens))
        self._answer(request, 200, payload)

    async def _stream(self, request: Any, parsed: schema.CompletionRequest) -> None:
        began = self._context.reactor.seconds()
        completion_id, created = _completion_id(self._chat), int(began)
        first = [True]

        def piece(text: str) -> None:
            stream.send(schema.chunk_object(parsed, completion_id, created, text,
                                            first=first[0]))
            first[0] = False

        run = self._run(parsed, began, piece)
        stream = EventStream(request, on_close=run.cancel)
        metrics = self._context.metrics
        metrics.open_streams.inc()
        try:
            outcome = await run.start()
        except CancelledError:
            self._count(CLIENT_CLOSED)
            return
        except ApiError as exc:
            if stream.started:  # the status went out already: the error is the last event
                stream.send(schema.error_object(exc))
                stream.done()
                self._count(exc.status)
            else:
                self._answer(request, exc.status, schema.error_object(exc))
            return
        finally:
            metrics.open_streams.dec()
        self._tokens(outcome)
        stream.send(schema.chunk_object(parsed, completion_id, created, "",
                                        finish_reason=outcome.finish_reason, first=first[0]))
        if parsed.include_usage:
            usage = schema.usage_object(outcome.prompt_tokens, outcome.completion_tokens)
            stream.send(schema.chunk_object(parsed, completion_id, created, None, usage=usage))
        stream.done()
        self._count(200)

    def _run(self, parsed: schema.CompletionRequest, began: float,
             piece: Any = None) -> CompletionRun:
        metrics, clock = self._context.metrics, self._context.reactor
        last = [began]

        def first_token() -> None:
            now = clock.seconds()
            metrics.time_to_first_token.observe(now - began)
            last[0] = now

        def next_token() -> None:
            now = clock.seconds()
            metrics.time_per_token.observe(now - last[0])
            last[0] = now

        return CompletionRun(self._context.client, parsed, clock, piece, first_token, next_token)

    def _answer(self, request: Any, status: int, payload: Any) -> None:
        if request.finished or _gone(request):
            self._count(CLIENT_CLOSED)
            return
        request.write(write_json(request, status, payload))
        request.finish()
        self._count(status)

    def _tokens(self, outcome: CompletionOutcome) -> None:
        self._context.metrics.prompt_tokens.inc(outcome.prompt_tokens)
        self._context.metrics.completion_tokens.inc(outcome.completion_tokens)

    def _count(self, status: int) -> None:
        self._context.metrics.requests.labels(self._endpoint, str(status)).inc()

    def _failed(self, failure: Any, request: Any) -> None:
        """Anything not already answered: a 500 with the reason, logged."""
        log.failure("completion failed", failure)
        error = api_error(failure.value)
        if request.startedWriting:  # a stream under way: end it
            if not request.finished and not _gone(request):
                request.finish()
            self._count(error.status)
            return
        self._answer(request, error.status, schema.error_object(error))


def _gone(request: Any) -> bool:
    """Whether the client closed the connection: twisted.web keeps no public flag (a
    ``Request`` drops its channel once the connection is lost)."""
    if getattr(request, "_disconnected", False):
        return True
    return hasattr(request, "channel") and request.channel is None


def _completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
