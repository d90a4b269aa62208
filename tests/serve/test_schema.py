"""OpenAI request parsing as a specification: what is accepted, and which field a refusal names."""

from __future__ import annotations

import pytest

from meshnode.errors import InvalidParameter, SwarmUnavailable
from meshnode.serve import schema

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body) -> str | None:
    with pytest.raises(InvalidParameter) as raised:
        parse(body)
    return raised.value.param


def test_a_plain_chat_request_takes_openai_defaults():
    """When a chat request gives only model and messages, then the defaults are OpenAI's."""
    request = schema.parse_chat_request(CHAT)
    assert request.chat and request.messages == ({"role": "user", "content": "hi"},)
    assert (request.temperature, request.top_p, request.max_tokens) == (1.0, 1.0, None)
    assert (request.stream, request.include_usage, request.stop) == (False, False, ())


def test_max_completion_tokens_wins_over_max_tokens():
    """When both are given, then max_completion_tokens is the limit (the newer name)."""
    request = schema.parse_chat_request({**CHAT, "max_tokens": 9, "max_completion_tokens": 4})
    assert request.max_tokens == 4


def test_roles_content_parts_and_developer():
    """When messages use text parts or the developer role, then they read as text and system."""
    request = schema.parse_chat_request({**CHAT, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
    ]})
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant"]
    assert request.messages[1]["content"] == "ab"


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"seed": "x"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
])
def test_a_bad_field_is_refused_by_name(extra, param):
    """When a field is bad, then ``InvalidParameter`` names it."""
    assert refused(schema.parse_chat_request, {**CHAT, **extra}) == param


def test_completion_prompt():
    """When a completion gives a prompt (or a list of one), then it is the text; else refused."""
    assert schema.parse_completion_request({"model": "m", "prompt": ["x"]}).prompt == "x"
    assert refused(schema.parse_completion_request, {"model": "m", "prompt": ""}) == "prompt"
    assert refused(schema.parse_completion_request, {"model": "m", "prompt": [1, 2]}) == "prompt"
    assert refused(schema.parse_completion_request,
                   {"model": "m", "prompt": "x", "echo": True}) == "echo"


def test_a_body_that_is_not_a_json_object_is_refused():
    """When the body is not JSON or not an object, then it is refused with no field named."""
    assert refused(schema.decode_body, b"{nope") is None
    assert refused(schema.decode_body, b"[1]") is None
    assert schema.decode_body(b'{"a": 1}') == {"a": 1}


def test_error_object_is_openais_shape():
    """When an error is answered, then its body is ``{"error": {message, type, param, code}}``."""
    body = schema.error_object(InvalidParameter("top_p", "top_p must be in (0, 1]"))
    assert body == {"error": {"message": "top_p must be in (0, 1]", "type": "invalid_request_error",
                              "param": "top_p", "code": "invalid_parameter"}}
    assert SwarmUnavailable("x").status == 503


def test_chunks_carry_role_first_and_usage_only_when_asked():
    """When a stream is built, then the first chat chunk has the role, and usage appears
    (null until the last, usage-only chunk) only with include_usage."""
    request = schema.parse_chat_request({**CHAT, "stream": True,
                                         "stream_options": {"include_usage": True}})
    first = schema.chunk_object(request, "id", 0, "He", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert first["usage"] is None
    last = schema.chunk_object(request, "id", 0, None, usage=schema.usage_object(3, 2))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
    plain = schema.parse_chat_request({**CHAT, "stream": True})
    assert "usage" not in schema.chunk_object(plain, "id", 0, "x")
