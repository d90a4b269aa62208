"""One completion through the mesh: prompt ids in, text pieces out, stop strings honoured.

``StopMatcher`` is pure: it holds back text that may be the start of a stop
string and says when one is reached. ``CompletionRun`` drives one request
over ``MeshClient.generate_ids``: it renders the prompt (the chat template for
chat requests, as ``meshnode generate --chat`` does), turns each new token
into text, and ends the generation early by cancelling its Deferred (which
closes the mesh sessions) when a stop string appears or the HTTP client goes
away. ``api_error`` maps what the mesh raised to the OpenAI error to answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred

from meshnode.client.generate import GenerationOptions
from meshnode.errors import (
    ApiError,
    InvalidParameter,
    MeshError,
    SwarmUnavailable,
    TokenizerError,
)
from meshnode.model.decoding import TextStream
from meshnode.model.sampling import SamplingOptions
from meshnode.serve.schema import DEFAULT_MAX_TOKENS, CompletionRequest

#: mesh error codes that mean "the swarm cannot serve this now" (503)
UNAVAILABLE_CODES = frozenset({
    "route_not_found", "no_capacity", "overloaded", "session_limit", "span_not_served",
    "connection_closed", "timeout", "unknown_session", "node_failed",
})


class StopMatcher:
    """Finds the first stop string in a growing text; emits only what is surely before it."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add ``piece``; returns the text that can be sent now (nothing once stopped)."""
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the generation: whatever was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best


@dataclass(frozen=True)
class CompletionOutcome:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class CompletionRun:
    """One request's generation; ``start()`` once, ``cancel()`` when the client leaves."""

    def __init__(self, client: Any, request: CompletionRequest, reactor: Any,
                 on_piece: Callable[[str], None] | None = None,
                 on_first_token: Callable[[], None] | None = None,
                 on_token: Callable[[], None] | None = None):
        self._client = client
        self._request = request
        self._reactor = reactor
        self._on_piece = on_piece
        self._on_first_token = on_first_token
        self._on_token_seen = on_token
        self._matcher = StopMatcher(request.stop)
        self._pieces: list[str] = []
        self._tokens = 0
        self._finished = False
        self._stopped_by_string = False
        self._generation: Deferred | None = None
        self.prompt_ids: list[int] = []

    def start(self) -> Deferred[CompletionOutcome]:
        return Deferred.fromCoroutine(self._run())

    def cancel(self) -> None:
        """End the generation now (its mesh sessions close); the run's Deferred fails."""
        self._finished = True
        if self._generation is not None and not self._generation.called:
            self._generation.cancel()

    async def _run(self) -> CompletionOutcome:
        client = self._client
        await client.start()
        tokenizer = client.tokenizer
        if tokenizer is None:
            raise InvalidParameter("model", "this model has no tokenizer: it cannot take text")
        self.prompt_ids = self._prompt_ids(tokenizer)
        stop_ids = frozenset(tokenizer.eos_ids) | frozenset(client.source.config.eos_token_ids)
        self._text = TextStream(tokenizer, stop_ids)
        request = self._request
        options = GenerationOptions(
            max_new_tokens=self._max_new_tokens(client.source.config.max_position_embeddings),
            sampling=SamplingOptions(temperature=request.temperature, top_p=request.top_p,
                                     seed=request.seed),
        )
        self._generation = client.generate_ids(self.prompt_ids, options, self._token)
        try:
            result = await self._generation
        except CancelledError:
            if not self._stopped_by_string:
                raise
            return self._outcome("stop")
        except ApiError:
            raise
        except MeshError as exc:
            raise api_error(exc) from exc
        self._emit(self._matcher.flush())
        if self._stopped_by_string:
            return self._outcome("stop")
        self._tokens = len(result.token_ids)
        return self._outcome("stop" if result.stop_reason == "eos" else "length")

    def _prompt_ids(self, tokenizer: Any) -> list[int]:
        request = self._request
        try:
            if request.chat:
                ids = tokenizer.encode_chat(list(request.messages), add_generation_prompt=True)
            else:
                ids = tokenizer.encode(request.prompt)
        except TokenizerError as exc:
            raise InvalidParameter("messages" if request.chat else "prompt", str(exc)) from exc
        if not ids:
            raise InvalidParameter("prompt", "the prompt holds no tokens")
        return ids

    def _max_new_tokens(self, context: int) -> int:
        """max_tokens, or the default within the model's context; refused here when over it
        (a worker would refuse the session, and the client would ban it for that)."""
        room = context - len(self.prompt_ids)
        if room < 1:
            raise InvalidParameter("messages" if self._request.chat else "prompt",
                                   f"the prompt has {len(self.prompt_ids)} tokens; the model's "
                                   f"context is {context}")
        wanted = self._request.max_tokens
        if wanted is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if wanted > room:
            raise InvalidParameter("max_tokens", f"{len(self.prompt_ids)} prompt tokens plus "
                                   f"max_tokens {wanted} is over the model's context of "
                                   f"{context}")
        return wanted

    def _token(self, token: int) -> None:
        if self._finished:
            return
        self._tokens += 1
        if self._tokens == 1 and self._on_first_token is not None:
            self._on_first_token()
        elif self._on_token_seen is not None:
            self._on_token_seen()
        self._emit(self._matcher.push(self._text.push(token)))
        if self._matcher.stopped:
            self._stopped_by_string = True
            self._finished = True
            # not from inside the generation's own callback: on the next reactor turn
            self._reactor.callLater(0, self._cancel_generation)

    def _cancel_generation(self) -> None:
        if self._generation is not None and not self._generation.called:
            self._generation.cancel()

    def _emit(self, text: str) -> None:
        if text:
            self._pieces.append(text)
            if self._on_piece is not None:
                self._on_piece(text)

    def _outcome(self, finish_reason: str) -> CompletionOutcome:
        return CompletionOutcome("".join(self._pieces), finish_reason, len(self.prompt_ids),
                                 self._tokens)


def api_error(exc: BaseException) -> ApiError:
    """The OpenAI error to answer for what a generation raised."""
    if isinstance(exc, ApiError):
        return exc
    code = getattr(exc, "code", None)
    if code in UNAVAILABLE_CODES:
        return SwarmUnavailable(f"the swarm cannot serve this request now: {_reasons(exc)}")
    if code == "length_limit":
        return InvalidParameter("max_tokens", f"prompt plus max_tokens is too long: {exc}")
    return ApiError(f"generation failed: {_reasons(exc)}")


def _reasons(exc: BaseException, depth: int = 4) -> str:
    """``exc``'s message, then those of what it was raised from or while handling (a
    worker's refusal behind "no route", say)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < depth:
        text = str(seen) or type(seen).__name__
        if text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return parts[0] + "".join(f" (after: {p})" for p in parts[1:])
