"""The generation loop, independent of where the blocks run.

``generate_tokens`` embeds the prompt, sends it through ``forward`` (all
blocks, as one callable), samples, and feeds each new token back one position
at a time until EOS or the token limit. ``forward(hidden [1, T, H],
start_position) -> hidden [1, T, H]`` may be the local span runner
(``meshnode.model.generate.LocalBlocks``) or the mesh client's chain of remote
workers: both share this loop, its stopping rule and its timings.

``TextStream`` turns the growing list of new ids into text pieces, holding
back bytes that do not yet form whole UTF-8 characters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from meshnode.errors import ModelError
from meshnode.model.head import ClientHead
from meshnode.model.sampling import Sampler
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
    """Run prefill then decode steps through ``forward``; see the module docstring."""
    if not prompt_ids:
        raise ModelError("the prompt holds no tokens")
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    began = clock()
    hidden = forward(head.embed(np.asarray([list(prompt_ids)], dtype=np.int32)), 0)  # [1, T, H]
    token = sampler(np.asarray(head.logits(hidden))[0])
    prefill_s = clock() - began

    generated = [token]
    position = len(prompt_ids)
    stop_reason = "length"
    decode_began = clock()
    steady_began = None  # after the first decode step, which compiles (or loads) its program
    while True:
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            stop_reason = "eos"
            break
        if len(generated) >= max_new_tokens:
            break
        hidden = forward(head.embed(np.asarray([[token]], dtype=np.int32)), position)  # [1, 1, H]
        token = sampler(np.asarray(head.logits(hidden))[0])
        generated.append(token)
        position += 1
        if steady_began is None:
            steady_began = clock()
    return TokenLoopResult(
        token_ids=tuple(generated),
        prefill_s=prefill_s,
        decode_tok_s=_decode_rate(len(generated) - 1, decode_began, steady_began, clock()),
        stop_reason=stop_reason,
    )


def _decode_rate(steps: int, began: float, steady_began: float | None, ended: float) -> float:
    """Tokens per second over the decode steps after the first; the first alone if only one."""
    if steps >= 2 and steady_began is not None and ended > steady_began:
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
