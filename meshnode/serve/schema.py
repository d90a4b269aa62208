"""The OpenAI request and response shapes, as pure functions: parse, validate, build.

``parse_chat_request`` / ``parse_completion_request`` turn a decoded JSON body
into a frozen ``CompletionRequest`` or raise ``InvalidParameter`` naming the
field at fault (the message says what is wanted). Fields this server does not
implement but that change the answer (``n`` > 1, ``logprobs``, tools) are
refused; fields that do not (``user``, ``presence_penalty`` = 0, ...) are
ignored, as OpenAI-compatible servers do. The ``*_object`` / ``*_chunk``
builders write the response bodies the ``openai`` client parses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from meshnode.errors import ApiError, InvalidParameter

#: new tokens when a request gives no max_tokens
DEFAULT_MAX_TOKENS = 256
#: stop strings a request may give (OpenAI's limit)
MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant")
#: fields that would change the answer and that this server does not implement
UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias", "best_of", "suffix")


@dataclass(frozen=True)
class CompletionRequest:
    """One chat or text completion request, validated."""

    model: str
    messages: tuple[dict[str, str], ...] | None  # chat
    prompt: str | None  # text completion
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def chat(self) -> bool:
        return self.messages is not None


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidParameter(None, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidParameter(None, "the body must be a JSON object")
    return body


def parse_chat_request(body: dict[str, Any]) -> CompletionRequest:
    """A ``/v1/chat/completions`` body."""
    return _parse(body, messages=_messages(body.get("messages")), prompt=None,
                  max_tokens=_first_int(body, "max_completion_tokens", "max_tokens"))


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    """A ``/v1/completions`` body."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameter("prompt", "prompt must be a non-empty string")
    if body.get("echo"):
        raise InvalidParameter("echo", "echo is not supported")
    return _parse(body, messages=None, prompt=prompt, max_tokens=_first_int(body, "max_tokens"))


def _parse(body: dict[str, Any], messages: tuple | None, prompt: str | None,
           max_tokens: int | None) -> CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model", "model must be a non-empty string")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise InvalidParameter(name, f"{name} is not supported by this server")
    if body.get("logprobs") not in (None, False, 0):
        raise InvalidParameter("logprobs", "logprobs are not supported by this server")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise InvalidParameter("n", "only n = 1 is supported")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParameter("stream_options", "stream_options must be an object")
    if options is not None and not stream:
        raise InvalidParameter("stream_options", "stream_options needs stream: true")
    include_usage = bool(options and _bool(options, "include_usage", "stream_options."))
    return CompletionRequest(
        model=model,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_optional_int(body, "seed"),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
    )


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidParameter("messages", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidParameter(where, f"{where} must be an object")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise InvalidParameter(f"{where}.role", f"role must be one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(message.get("content"), where)})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text parts
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidParameter(f"{where}.content", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidParameter(f"{where}.content", "content must be a string or text parts")


def _first_int(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = _optional_int(body, name)
        if value is not None:
            if value < 1:
                raise InvalidParameter(name, f"{name} must be at least 1")
            return value
    return None


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"{name} must be an integer")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameter(name, f"{name} must be a number")
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise InvalidParameter(name, f"{name} must be in {bracket}{low:g}, {high:g}]")
    return float(value)


def _bool(body: dict[str, Any], name: str, prefix: str = "") -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParameter(prefix + name, f"{name} must be true or false")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidParameter("stop", "stop must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(stops)


# --- responses ----------------------------------------------------------------


def error_object(error: ApiError) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": str(error), "type": error.kind, "param": error.param,
                      "code": error.code}}


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_object(model_ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "meshnode"}
        for m in model_ids
    ]}


def completion_object(request: CompletionRequest, completion_id: str, created: int, text: str,
                      finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    """The whole answer of a non-streamed request."""
    if request.chat:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None,
                                  "message": {"role": "assistant", "content": text}}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None, "text": text}
        kind = "text_completion"
    return {"id": completion_id, "object": kind, "created": created, "model": request.model,
            "choices": [choice], "usage": usage}


def chunk_object(request: CompletionRequest, completion_id: str, created: int,
                 text: str | None, finish_reason: str | None = None, first: bool = False,
                 usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed request; ``text`` None: the usage-only chunk."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if request.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                        "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": finish_reason,
                        "logprobs": None}]
    kind = "chat.completion.chunk" if request.chat else "text_completion"
    chunk: dict[str, Any] = {"id": completion_id, "object": kind, "created": created,
                             "model": request.model, "choices": choices}
    if request.include_usage:
        chunk["usage"] = usage
    return chunk
