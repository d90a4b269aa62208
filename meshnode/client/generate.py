"""Generation through the mesh: the step-driven ``Generation`` driven from the reactor.

``meshnode.model.decoding.Generation`` is the one generation (local and mesh
share its prefill, decode, stopping rule, sampling and timings); it does no
I/O. ``drive`` is its mesh driver, plain ``async`` code on the reactor thread:
it sends each step's hidden states through the ``InferenceChain``, then hands
the chain's output to the client's compute thread (``HeadCompute``), which
computes the logits, samples the next token and embeds it as the next step's
input, in one call. No thread is held per generation: many
generations interleave on the reactor and share the one compute thread;
``on_token`` runs on the reactor thread.

Hidden states travel in the head's compute dtype (float32 on CPU, bfloat16 on
accelerators, as local generation computes), so the mesh's tokens are the
local ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from meshnode.client.chain import InferenceChain
from meshnode.client.routing.route import Route
from meshnode.compute import ComputeThread
from meshnode.errors import ClientError, GenerationInterrupted
from meshnode.inference.messages import WIRE_FLOAT_DTYPES
from meshnode.model.decoding import (
    BlocksInput,
    Generation,
    GenerationResult,
    NextToken,
    TokenLoopResult,
)
from meshnode.model.sampling import SamplingOptions

DEFAULT_MAX_NEW_TOKENS = 64

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """The options of ``meshnode generate``, local or mesh."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    chat: bool = False
    system: str | None = None


@dataclasses.dataclass(frozen=True)
class MeshGenerationResult(GenerationResult):
    """A generation's result, plus the route it went through."""

    route: tuple[dict, ...] = ()

    def as_json(self) -> dict:
        return super().as_json() | {"route": list(self.route)}


@dataclasses.dataclass(frozen=True)
class Advance:
    """One step's work on the head: the token chosen, and unless it was the last, the next
    input for the chain, embedded (``hidden`` [1, T, H] as the wire carries it)."""

    produced: NextToken | None
    step: BlocksInput | None
    hidden: np.ndarray | None


class HeadCompute:
    """The client head's JAX work on the compute thread: one call per step.

    Each call turns the chain's output into logits, samples the next token and
    embeds it as the next input, so a step crosses to the compute thread once.
    """

    def __init__(self, head: Any, compute: ComputeThread):
        self.head = head
        self.compute = compute

    def first(self, generation: Generation) -> Deferred[Advance]:
        """The prefill's input, embedded."""
        return self.compute.call(self._first, generation)

    def advance(self, generation: Generation, hidden: np.ndarray) -> Deferred[Advance]:
        """The chain's output [1, T, H] -> ``generation``'s next token and next input."""
        return self.compute.call(self._advance, generation, hidden)

    def _first(self, generation: Generation) -> Advance:
        step = generation.next_input()
        return Advance(None, step, self._embed(step))

    def _advance(self, generation: Generation, hidden: np.ndarray) -> Advance:
        logits = np.asarray(self.head.logits(hidden))[0]  # [V] float32
        produced = generation.take_logits(logits)
        if generation.done:
            return Advance(produced, None, None)
        step = generation.next_input()
        return Advance(produced, step, self._embed(step))

    def _embed(self, step: BlocksInput) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(self.head.embed(step.ids())))  # [1, T, H]
        return x if x.dtype.name in WIRE_FLOAT_DTYPES else x.astype(np.float32)


class StopRequest:
    """Set when a generation's Deferred is cancelled; checked between steps."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """``CancelledError`` once a stop was requested."""
        if self.requested:
            raise CancelledError()


def cancellable(start: Callable[[StopRequest], Coroutine[Any, Any, T]]) -> Deferred[T]:
    """The Deferred of the coroutine ``start(stop)``; cancelling it stops it at once.

    ``cancel()`` sets ``stop`` (seen between steps, even when it is called from an
    ``on_token`` callback, while the coroutine runs), cancels what the coroutine
    awaits now (a step in flight, a route lookup), and fails the Deferred with
    ``CancelledError`` once the coroutine has finished its cleanup (closing its
    sessions on every worker).
    """
    stop = StopRequest()
    inner = Deferred.fromCoroutine(start(stop))

    def cancel(outer: Deferred[T]) -> None:
        stop.requested = True
        outer.pause()  # Deferred.cancel fails it next; its callbacks wait for the cleanup
        inner.cancel()

    outer: Deferred[T] = Deferred(cancel)

    def settle(result: Any) -> None:
        if stop.requested:
            outer.unpause()
        elif isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    inner.addBoth(settle)
    return outer


async def drive(
    generation: Generation,
    head: HeadCompute,
    chain: InferenceChain,
    on_token: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> TokenLoopResult:
    """Run ``generation`` to its end through ``chain``; on the reactor thread."""
    stop = stop or StopRequest()
    stop.check()
    advance = await head.first(generation)
    while advance.step is not None:
        if advance.step.start != chain.position:
            raise ClientError(
                f"step at {advance.step.start}, but the chain is at {chain.position}"
            )
        output = await chain.forward(advance.hidden)  # [1, T, H]
        advance = await head.advance(generation, output)
        if on_token is not None:
            on_token(advance.produced.token)
        if advance.step is not None:
            stop.check()
    return generation.result()


async def generate_on_chain(
    generation: Generation,
    head: HeadCompute,
    chain: InferenceChain,
    on_token: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
    text_of: Callable[[tuple[int, ...]], str] = lambda ids: "",
) -> TokenLoopResult:
    """Open ``chain``, ``drive`` the generation through it, and close it whatever happens.

    A failure after the first token raises ``GenerationInterrupted`` (with the tokens so
    far and ``text_of`` them) from the cause; before it, the cause itself. A cancellation
    stays ``CancelledError``.
    """
    await chain.open()
    try:
        return await drive(generation, head, chain, on_token, stop)
    except CancelledError:
        raise
    except Exception as error:
        if not generation.token_ids:
            raise
        tokens = generation.token_ids
        raise interrupted(error, tokens, text_of(tokens)) from error
    finally:
        await chain.close()


def interrupted(
    cause: Exception, token_ids: tuple[int, ...], text: str
) -> GenerationInterrupted:
    """A ``GenerationInterrupted`` that is also of the cause's class, with its fields.

    So callers that catch the cause's kind (``except RouteNotFound`` and its
    ``missing``, ``RemoteError.code``) still do, and those that want the tokens
    produced so far catch ``GenerationInterrupted``.
    """
    kind = _interrupted_kind(type(cause))
    if kind is GenerationInterrupted:
        return GenerationInterrupted(cause, token_ids, text)
    error = kind.__new__(kind)
    BaseException.__init__(error, *cause.args)  # the cause's message, as it prints
    vars(error).update(vars(cause))
    error.token_ids, error.text = tuple(token_ids), text
    code = getattr(cause, "code", None)
    if isinstance(code, str):
        error.code = code
    return error


_INTERRUPTED_KINDS: dict[type, type] = {}


def _interrupted_kind(cause: type) -> type:
    """``GenerationInterrupted`` mixed with ``cause`` (made once per class)."""
    if issubclass(cause, GenerationInterrupted):
        return GenerationInterrupted
    kind = _INTERRUPTED_KINDS.get(cause)
    if kind is None:
        try:
            kind = type(
                "GenerationInterrupted",
                (GenerationInterrupted, cause),
                {"__module__": __name__, "__doc__": GenerationInterrupted.__doc__},
            )
        except TypeError:  # a class that cannot be mixed in (layout, metaclass)
            kind = GenerationInterrupted
        _INTERRUPTED_KINDS[cause] = kind
    return kind


def mesh_result(
    loop_result: TokenLoopResult, text: str, prompt_ids: list[int], route: Route
) -> MeshGenerationResult:
    return MeshGenerationResult(
        token_ids=loop_result.token_ids,
        text=text,
        prefill_s=loop_result.prefill_s,
        decode_tok_s=loop_result.decode_tok_s,
        stop_reason=loop_result.stop_reason,
        prompt_ids=tuple(prompt_ids),
        route=tuple(route.describe()),
    )
