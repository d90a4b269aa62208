"""Generation through the mesh: the step-driven ``Generation`` driven from the reactor.

``meshnode.model.decoding.Generation`` is the one generation (local and mesh
share its prefill, decode, stopping rule, sampling and timings); it does no
I/O. ``drive`` is its mesh driver, plain ``async`` code on the reactor thread:
it sends each step's hidden states through the ``InferenceChain``, then hands
the chain's output to the client's compute thread (``HeadCompute``), which
computes the logits, samples the next token and embeds it as the next step's
input, in one call. No thread is held per generation: many
generations interleave on the reactor and share the one compute thread, and
the advances that wait for it at once run as one batched logits call and one
batched embed call (``head_batch``); ``on_token`` runs on the reactor thread.

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
from meshnode.client.head_batch import AdvanceQueue, rows_by_key
from meshnode.client.routing.route import Route
from meshnode.compute import ComputeThread, EndOfTurn, row_bucket
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


#: the most advances one batched head call takes. A head call of 8 rows costs about as
#: much a row as one of 32 (the quantized head: 0.64 against 0.59 ms), and its steps
#: leave in one turn, as one bundle per worker: with more generations in flight they
#: form several groups, which then keep the chain's workers and this head busy at once
#: instead of in turn (32 sessions through 3 workers: 198-203 tok/s against 179-187
#: with 64, and a p99 of 180-200 ms against 243-245).
MAX_HEAD_BATCH = 8


class HeadCompute:
    """The client head's JAX work on the compute thread, batched across generations.

    ``advance`` turns the chain's output into logits, samples the next token and
    embeds it as the next input, so a step crosses to the compute thread once.
    Concurrent generations share those calls: the advances waiting when the
    head is free run as one batch (``head_batch.AdvanceQueue``): one logits
    call over every row's last position, one embed call per input length, then
    each generation gets its own result (or its own failure). A head whose rows
    are not bitwise independent of their batch-mates (``batch_invariant`` false:
    no native kernels, an accelerator) runs one advance per call, so tokens are
    always those of the generation run alone.

    With a ``clock`` (the client's reactor), an advance that finds the head free
    starts a batch at the end of the reactor turn (``callLater(0)``), with every
    advance that turn brought: the outputs of one worker iteration arrive
    together, and would otherwise split into a batch of one and the rest.
    """

    def __init__(self, head: Any, compute: ComputeThread, max_batch: int | None = None,
                 clock: Any = None):
        self.head = head
        self.compute = compute
        self._start_soon = EndOfTurn(clock, self._start).soon
        if max_batch is None:
            max_batch = MAX_HEAD_BATCH if getattr(head, "batch_invariant", False) else 1
        self._queue: AdvanceQueue[_Waiting] = AdvanceQueue(max_batch)
        self._starting = self._again = False

    def first(self, generation: Generation) -> Deferred[Advance]:
        """The prefill's input, embedded."""
        return self.compute.call(self._first, generation)

    def advance(self, generation: Generation, hidden: np.ndarray) -> Deferred[Advance]:
        """The chain's output [1, T, H] -> ``generation``'s next token and next input."""
        waiting = _Waiting(generation, hidden, Deferred())
        if self._queue.add(waiting):
            self._start_soon()
        return waiting.done

    def _start(self) -> None:
        """Hand the waiting advances to the compute thread as one batch, if the head is
        free. A loop, not recursion, when the compute call fires at once (in tests)."""
        if self._starting:
            self._again = True
            return
        self._starting = True
        try:
            self._again = True
            while self._again:
                self._again = False
                batch = self._queue.take()
                if batch:
                    rows = [(w.generation, w.hidden) for w in batch]
                    self.compute.call(self._advance_rows, rows).addBoth(self._deliver, batch)
        finally:
            self._starting = False

    def _deliver(self, results: list[Advance | Failure] | Failure, batch: list[_Waiting]) -> None:
        for index, waiting in enumerate(batch):
            outcome = results if isinstance(results, Failure) else results[index]
            if waiting.done.called:  # cancelled meanwhile
                continue
            if isinstance(outcome, Failure):
                waiting.done.errback(outcome)
            else:
                waiting.done.callback(outcome)
        self._start()

    def _first(self, generation: Generation) -> Advance:
        step = generation.next_input()
        hidden = self._embed([step])[0]
        if isinstance(hidden, Failure):
            hidden.raiseException()
        return Advance(None, step, hidden)

    def _advance_rows(
        self, rows: list[tuple[Generation, np.ndarray]]
    ) -> list[Advance | Failure]:
        """On the compute thread: every row's logits, token and next input, batched."""
        logits = self._logits([hidden for _, hidden in rows])
        chosen: list[tuple[NextToken, BlocksInput | None] | Failure] = []
        for (generation, _), row in zip(rows, logits, strict=True):
            chosen.append(row if isinstance(row, Failure) else _choose(generation, row))
        steps = [c[1] for c in chosen if not isinstance(c, Failure) and c[1] is not None]
        embedded = iter(self._embed(steps))
        results: list[Advance | Failure] = []
        for c in chosen:
            if isinstance(c, Failure) or c[1] is None:
                results.append(c if isinstance(c, Failure) else Advance(c[0], None, None))
                continue
            hidden = next(embedded)
            results.append(hidden if isinstance(hidden, Failure) else Advance(*c, hidden))
        return results

    def _logits(self, outputs: list[np.ndarray]) -> list[np.ndarray | Failure]:
        """Each output's last-position logits [V]; outputs of one form share one call."""
        rows: list[np.ndarray | Failure] = [None] * len(outputs)  # type: ignore[list-item]
        for group in rows_by_key(outputs, _output_key):
            parts = [outputs[i] for i in group]
            batched = [np.asarray(p)[:, -1:] for p in parts] if len(parts) > 1 else parts
            for index, value in zip(group, _calls(self.head.logits, batched), strict=True):
                rows[index] = value
        return rows

    def _embed(self, steps: list[BlocksInput]) -> list[np.ndarray | Failure]:
        """Each step's input [1, T, H] for the wire; steps of one length share one call."""
        rows: list[np.ndarray | Failure] = [None] * len(steps)  # type: ignore[list-item]
        for group in rows_by_key(steps, lambda step: len(step.token_ids)):
            ids = [np.asarray(steps[i].ids()) for i in group]  # [1, T] each
            for index, value in zip(group, _calls(self.head.embed, ids), strict=True):
                rows[index] = value if isinstance(value, Failure) else _wire(value)
        return rows


@dataclasses.dataclass(frozen=True)
class _Waiting:
    generation: Generation
    hidden: np.ndarray
    done: Deferred


def _output_key(hidden: Any) -> tuple | None:
    """What outputs must share to go in one logits call (None: a shape to refuse alone)."""
    shape = getattr(hidden, "shape", ())
    if len(shape) != 3 or shape[0] != 1:
        return None
    return (shape[-1], np.asarray(hidden).dtype.str)


def _calls(function: Callable[[Any], Any], parts: list[Any]) -> list[Any]:
    """``function`` over ``parts`` [1, ...] stacked on the first axis and padded with zero
    rows to a row bucket (one compiled program per bucket, not per batch size), one result
    row per part; if the stacked call fails, each part alone, so a failure is its own."""
    if len(parts) > 1:
        try:
            stacked = np.concatenate(parts)  # [B, ...]
            padding = row_bucket(len(parts)) - len(parts)
            if padding:
                filler = np.zeros((padding, *stacked.shape[1:]), stacked.dtype)
                stacked = np.concatenate([stacked, filler])  # [Bp, ...]
            out = np.asarray(function(stacked))  # [Bp, ...]
            return [out[i : i + 1] for i in range(len(parts))]
        except Exception:  # noqa: BLE001 - each part again, alone, for its own error
            pass
    results: list[Any] = []
    for part in parts:
        try:
            results.append(np.asarray(function(part)))  # [1, ...]
        except Exception:  # noqa: BLE001 - this part's failure, for its generation
            results.append(Failure())
    return results


def _choose(
    generation: Generation, logits: np.ndarray
) -> tuple[NextToken, BlocksInput | None] | Failure:
    """The token from ``logits`` [1, V], and the generation's next input unless it is done."""
    try:
        produced = generation.take_logits(logits[0])
        return produced, None if generation.done else generation.next_input()
    except Exception:  # noqa: BLE001 - this generation's failure alone
        return Failure()


def _wire(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)  # [1, T, H]
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
