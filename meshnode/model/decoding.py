"""Generation, independent of where the blocks run: a step-driven ``Generation``.

``Generation`` is one generation as a state machine that does no I/O and no
JAX work: ``next_input()`` says what the blocks take next (the prompt's ids
at position 0, then each new token at its position), the driver embeds them,
runs them through every block and turns the last position into logits, and
``take_logits(logits)`` samples the next token and says whether to stop (an
EOS id, or ``max_new_tokens`` reached). It owns prefill, decode, stopping,
sampling and the timings (``prefill_s``, ``decode_tok_s``), so every driver
reports them the same way:

    generation = Generation(prompt_ids, max_new_tokens=32, sampler=Sampler())
    while not generation.done:
        step = generation.next_input()                                   # ids [1, T], start
        hidden = forward(head.embed(step.ids()), step.start)              # [1, T, H]
        token = generation.take_logits(head.logits(hidden)[0]).token      # logits [V]
    generation.result()                      # TokenLoopResult: token_ids, timings, stop_reason

``generate_tokens`` is that loop, synchronous, over a ``forward(hidden [1, T, H],
start_position) -> hidden [1, T, H]`` callable (the local span runner,
``meshnode.model.generate.LocalBlocks``); the mesh client drives the same
object from async code on the reactor (``meshnode.client.generate``).

``TextStream`` turns the growing list of new ids into text pieces, holding
back bytes that do not yet form whole UTF-8 characters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from meshnode.errors import ModelError
from meshnode.model.sampling import Sampler

if TYPE_CHECKING:  # no JAX to import for the step-driven part
    from meshnode.model.head import ClientHead
    from meshnode.model.tokenizer import Tokenizer

#: (hidden [1, T, H] of the new positions, start_position) -> hidden [1, T, H]
BlocksForward = Callable[[Any, int], Any]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens only; prefill_s = prompt in to first token out; decode_tok_s = the rate
    of the decode steps after the first, whose time includes compiling (or loading from
    the compilation cache) the one-token program; with a single decode step, that step's."""

    token_ids: tuple[int, ...]
    text: str
    prefill_s: float
    decode_tok_s: float
    stop_reason: str  # "eos" or "length"
    prompt_ids: tuple[int, ...] = ()

    def as_json(self) -> dict:
        return {
            "token_ids": list(self.token_ids),
            "text": self.text,
            "prefill_s": self.prefill_s,
            "decode_tok_s": self.decode_tok_s,
            "stop_reason": self.stop_reason,
        }


@dataclasses.dataclass(frozen=True)
class TokenLoopResult:
    """What ``Generation.result()`` gives: new tokens, timings (as ``GenerationResult``)."""

    token_ids: tuple[int, ...]
    prefill_s: float
    decode_tok_s: float
    stop_reason: str


def prompt_token_ids(
    tokenizer: Tokenizer, prompt: str, chat: bool, system: str | None = None
) -> list[int]:
    """The prompt's ids: through the chat template (with the generation prompt) or as is."""
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


#: why a generation stopped: a stop (EOS) id was sampled, or max_new_tokens were
STOP_EOS, STOP_LENGTH = "eos", "length"


@dataclasses.dataclass(frozen=True)
class BlocksInput:
    """What the blocks take next: the embeddings of ``token_ids`` at positions from ``start``
    (the whole prompt at 0 for the prefill, then one new token per decode step)."""

    token_ids: tuple[int, ...]
    start: int

    @property
    def prefill(self) -> bool:
        return self.start == 0

    def ids(self) -> np.ndarray:
        return np.asarray([self.token_ids], dtype=np.int32)  # [1, T]


@dataclasses.dataclass(frozen=True)
class NextToken:
    """The token a step produced; ``stop_reason`` is None while the generation goes on."""

    token: int
    stop_reason: str | None = None


class Generation:
    """One generation, step by step: prefill, decode, stopping, sampling and timings.

    Call ``next_input()`` and ``take_logits()`` in turn until ``done``; then
    ``result()``. ``clock`` is read when the prefill's input is handed out and
    when each token is chosen; nothing else here reads time or does I/O.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        sampler: Sampler,
        stop_ids: frozenset[int] = frozenset(),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not prompt_ids:
            raise ModelError("the prompt holds no tokens")
        if max_new_tokens < 1:
            raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prompt_ids = tuple(int(i) for i in prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.stop_ids = frozenset(stop_ids)
        self._clock = clock
        self._generated: list[int] = []
        self._pending: BlocksInput | None = None  # handed out, its logits not yet taken
        self.stop_reason: str | None = None
        self._began = self._prefill_done = self._steady_began = self._ended = 0.0

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The new tokens so far."""
        return tuple(self._generated)

    def next_input(self) -> BlocksInput:
        """The ids to embed and send through every block next, and where they start."""
        if self.done:
            raise ModelError(f"the generation has stopped ({self.stop_reason})")
        if self._pending is not None:
            raise ModelError("the last input's logits were not taken yet")
        if not self._generated:
            self._began = self._clock()
            self._pending = BlocksInput(self.prompt_ids, 0)
        else:
            start = len(self.prompt_ids) + len(self._generated) - 1
            self._pending = BlocksInput((self._generated[-1],), start)
        return self._pending

    def take_logits(self, logits: Any) -> NextToken:
        """The blocks' output for the last input, as logits [V] of its last position: the
        sampled token, and the stop reason when it is the last one."""
        if self._pending is None:
            raise ModelError("take_logits without an input handed out")
        self._pending = None
        token = self.sampler(np.asarray(logits))
        self._generated.append(token)
        now = self._clock()
        if len(self._generated) == 1:
            self._prefill_done = now
        elif len(self._generated) == 2:
            self._steady_began = now  # after the first decode step, which compiles its program
        if token in self.stop_ids:
            self.stop_reason = STOP_EOS
        elif len(self._generated) >= self.max_new_tokens:
            self.stop_reason = STOP_LENGTH
        if self.stop_reason is not None:
            self._ended = now
        return NextToken(token, self.stop_reason)

    def result(self) -> TokenLoopResult:
        """Tokens, timings and stop reason of a finished generation."""
        if not self.done:
            raise ModelError("the generation has not stopped yet")
        steps = len(self._generated) - 1
        return TokenLoopResult(
            token_ids=self.token_ids,
            prefill_s=self._prefill_done - self._began,
            decode_tok_s=_decode_rate(steps, self._prefill_done, self._steady_began, self._ended),
            stop_reason=self.stop_reason,
        )


def generate_tokens(
    head: ClientHead,
    forward: BlocksForward,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: frozenset[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TokenLoopResult:
    """A ``Generation`` driven synchronously through ``forward``; see the module docstring."""
    generation = Generation(
        prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, stop_ids=stop_ids, clock=clock
    )
    while not generation.done:
        step = generation.next_input()
        hidden = forward(head.embed(step.ids()), step.start)  # [1, T, H]
        produced = generation.take_logits(np.asarray(head.logits(hidden))[0])  # logits [V]
        if on_token is not None:
            on_token(produced.token)
    return generation.result()


def _decode_rate(steps: int, began: float, steady_began: float, ended: float) -> float:
    """Tokens per second over the decode steps after the first; the first alone if only one."""
    if steps >= 2 and ended > steady_began:
        return (steps - 1) / (ended - steady_began)
    return steps / (ended - began) if steps and ended > began else 0.0


class TextStream:
    """Incremental detokenisation: push ids, get the text they add."""

    def __init__(self, tokenizer: Tokenizer, skip_ids: frozenset[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_ids
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece

    def text(self) -> str:
        return self._tokenizer.decode(self._ids)
