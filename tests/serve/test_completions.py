"""One completion over a fake mesh client: stop strings, finish reasons, cancellation, errors."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock

from meshnode.client.generate import MeshGenerationResult
from meshnode.errors import InvalidParameter, NoCapacity, RemoteError, RouteNotFound
from meshnode.serve import schema
from meshnode.serve.completions import CompletionRun, StopMatcher, api_error


def test_stop_matcher_holds_back_a_possible_start():
    """When text may be the start of a stop string, then it is held until it is not."""
    matcher = StopMatcher(("END",))
    assert matcher.push("abcE") == "abc"
    assert matcher.push("x") == "Ex"
    assert matcher.push("yEN") == "y"
    assert matcher.push("D and more") == ""
    assert matcher.stopped and matcher.flush() == ""


def test_stop_matcher_finds_the_first_of_several_and_flushes():
    """When several stop strings could match, then the text ends before the first one; with
    none, flush gives back what was held."""
    matcher = StopMatcher(("zz", "b"))
    assert matcher.push("aab zz") == "aa"
    other = StopMatcher(("xyz",))
    assert other.push("abxy") == "ab"
    assert other.flush() == "xy"


class FakeTokenizer:
    """Token i is the character chr(i); 0 is EOS."""

    eos_ids = frozenset({0})

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode("".join(m["content"] for m in messages) + ">")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


class FakeConfig:
    eos_token_ids = ()
    max_position_embeddings = 64


class FakeSource:
    config = FakeConfig()


class FakeClient:
    """Calls ``on_token`` for each of ``tokens`` when the test says so (``emit``)."""

    def __init__(self, tokens: str, stop_reason: str = "length", error: Exception | None = None):
        self.tokenizer = FakeTokenizer()
        self.source = FakeSource()
        self.tokens = [ord(c) if c != "$" else 0 for c in tokens]
        self.stop_reason = stop_reason
        self.error = error
        self.cancelled = False
        self.prompt_ids = None

    def start(self):
        return succeed(None)

    def generate_ids(self, prompt_ids, options, on_token):
        self.prompt_ids, self.options, self.on_token = prompt_ids, options, on_token
        if self.error is not None:
            return fail(self.error)

        def cancel(d):
            self.cancelled = True

        self.generation = Deferred(cancel)
        return self.generation

    def emit(self):
        for token in self.tokens:
            if self.cancelled:
                return
            self.on_token(token)
        if not self.cancelled:
            self.generation.callback(MeshGenerationResult(
                tuple(self.tokens), "", 0.0, 0.0, self.stop_reason, tuple(self.prompt_ids)))


def chat_request(**extra):
    return schema.parse_chat_request({"model": "m", "messages": [{"role": "user",
                                                                   "content": "hi"}], **extra})


def run(client, request, clock=None):
    pieces, outcomes = [], []
    clock = clock or Clock()
    completion = CompletionRun(client, request, clock, pieces.append)
    d = completion.start()
    d.addBoth(outcomes.append)
    return completion, pieces, outcomes, clock


def test_chat_goes_through_the_template_and_ends_with_length():
    """When a chat completion runs to max_tokens, then the prompt is the template's, the
    pieces are the text and the finish reason is "length"."""
    client = FakeClient("hello")
    _, pieces, outcomes, _ = run(client, chat_request(max_tokens=5, temperature=0))
    client.emit()
    assert client.prompt_ids == [ord(c) for c in "hi>"]
    assert client.options.max_new_tokens == 5 and client.options.sampling.greedy
    outcome = outcomes[0]
    assert ("".join(pieces), outcome.text, outcome.finish_reason) == ("hello", "hello", "length")
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (3, 5)


def test_eos_is_stop_and_not_text():
    """When the model emits EOS, then the finish reason is "stop" and EOS adds no text."""
    client = FakeClient("ab$", stop_reason="eos")
    _, pieces, outcomes, _ = run(client, chat_request())
    client.emit()
    assert (outcomes[0].text, outcomes[0].finish_reason, pieces) == ("ab", "stop", ["a", "b"])


def test_a_stop_string_cancels_the_generation():
    """When a stop string appears, then the text ends before it, the finish reason is "stop",
    and the generation is cancelled (its mesh sessions close) on the next reactor turn."""
    client = FakeClient("abcSTOPdefgh")
    _, _, outcomes, clock = run(client, chat_request(stop="STOP"))
    for token in "abcSTOPd":
        client.on_token(ord(token))
    assert not outcomes
    clock.advance(0)
    assert client.cancelled
    assert (outcomes[0].text, outcomes[0].finish_reason) == ("abc", "stop")
    assert outcomes[0].completion_tokens == len("abcSTOP")


def test_cancel_fails_the_run_and_cancels_the_generation():
    """When the HTTP client leaves, then the generation is cancelled and the run fails with
    CancelledError, and later tokens are ignored."""
    client = FakeClient("abcdef")
    completion, pieces, outcomes, _ = run(client, chat_request())
    client.on_token(ord("a"))
    completion.cancel()
    client.on_token(ord("b"))
    assert client.cancelled and pieces == ["a"]
    assert outcomes[0].check(CancelledError)


@pytest.mark.parametrize(("error", "status", "param"), [
    (RouteNotFound("blocks 3-5 are not served"), 503, None),
    (NoCapacity("cache full"), 503, None),
    (RemoteError("no_capacity", "cache full"), 503, None),
    (RemoteError("length_limit", "too long"), 400, "max_tokens"),
])
def test_mesh_errors_become_api_errors(error, status, param):
    """When the mesh cannot serve, then the run fails with the API error to answer."""
    _, _, outcomes, _ = run(FakeClient("", error=error), chat_request())
    failure = outcomes[0]
    assert (failure.value.status, failure.value.param) == (status, param)
    assert str(error) in str(failure.value)
    assert api_error(error).status == status


def test_max_tokens_over_the_context_is_refused_and_the_default_fits():
    """When prompt plus max_tokens is over the model's context, then it is a 400 on
    max_tokens before any mesh session; without max_tokens, the default fits the context."""
    client = FakeClient("")
    _, _, outcomes, _ = run(client, chat_request(max_tokens=62))
    assert outcomes[0].value.param == "max_tokens" and client.prompt_ids is None
    client = FakeClient("")
    run(client, chat_request())
    assert client.options.max_new_tokens == 64 - 3


def test_a_503_gives_the_reasons_behind_it():
    """When the mesh error was raised from another, then the 503's message gives both."""
    try:
        try:
            raise NoCapacity("64 cache tokens free, 300 asked")
        except NoCapacity as cause:
            raise RouteNotFound("no eligible worker serves blocks 0-5") from cause
    except RouteNotFound as exc:
        error = api_error(exc)
    assert error.status == 503
    assert str(error).endswith("blocks 0-5 (after: 64 cache tokens free, 300 asked)")


def test_a_model_without_tokenizer_is_refused():
    """When the model has no tokenizer, then a text request is a 400 on ``model``."""
    client = FakeClient("")
    client.tokenizer = None
    _, _, outcomes, _ = run(client, chat_request())
    assert outcomes[0].check(InvalidParameter) and outcomes[0].value.param == "model"
