"""Local generation: every block in this process, driving the shared ``Generation``.

    from meshnode.model.generate import LocalModel, generate_local
    from meshnode.model.source import open_model

    model = LocalModel.load(open_model("smollm2"))
    result = model.generate("What is the capital of France?", chat=True, max_new_tokens=32,
                            on_text=lambda piece: print(piece, end="", flush=True))
    result.token_ids, result.text, result.prefill_s, result.decode_tok_s

``LocalModel`` loads the client head and one span runner over all blocks once;
each ``generate`` call allocates a fresh cache sized for its prompt plus
``max_new_tokens`` (``LocalBlocks``: pages of a paged arena, run as a batching
worker runs a session).
``generate_local(source, ...)`` does both in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meshnode.errors import CacheOverflow, ModelError, ShapeMismatch
from meshnode.model.buckets import CHUNK, bucket_length, chunk_shape
from meshnode.model.decoding import (
    GenerationResult,
    TextStream,
    generate_tokens,
    prompt_token_ids,
)
from meshnode.model.dtypes import default_compute_dtype
from meshnode.model.head import ClientHead
from meshnode.model.paged import PAGE, PagedArena, pages_for
from meshnode.model.sampling import Sampler, SamplingOptions
from meshnode.model.source import ModelSource
from meshnode.model.span import SpanRunner


class LocalBlocks:
    """A BlocksForward over a SpanRunner: one session's pages of an arena of its own, run
    as a batching worker runs a session (meshnode/worker/arena.py): a prompt in chunks of
    at most ``CHUNK`` positions, each query attending to its causal prefix only, a decode
    step as one row over the page table: the same chunks and kernels as a worker."""

    def __init__(self, runner: SpanRunner, max_length: int) -> None:
        self.runner = runner
        width = pages_for(bucket_length(max(max_length, PAGE)))  # a few widths, few programs
        self.positions = width * PAGE
        self.arena: PagedArena = runner.new_arena(width + 1)  # + the scratch page
        self.table = np.arange(1, width + 1, dtype=np.int32)[None]  # [1, M]

    def __call__(self, hidden: Any, start_position: int) -> jax.Array:
        hidden = np.asarray(hidden, np.float32)
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
            raise ShapeMismatch(f"local blocks take [1, T, H], got shape {hidden.shape}")
        length = hidden.shape[1]
        if start_position < 0 or start_position + length > self.positions:
            raise CacheOverflow(f"positions [{start_position}, {start_position + length}) "
                                f"do not fit a cache of {self.positions}")
        if length == 1:
            return self._forward(hidden, start_position, self.positions)
        outs = []
        for offset in range(0, length, CHUNK):
            piece = hidden[:, offset : offset + CHUNK]  # [1, t, H]
            start = start_position + offset
            padded, kv_length = chunk_shape(start, piece.shape[1], self.positions,
                                            self.runner.prefix_free)
            rows = np.zeros((1, padded, hidden.shape[2]), np.float32)  # [1, padded, H]
            rows[:, : piece.shape[1]] = piece
            outs.append(self._forward(rows, start, kv_length)[:, : piece.shape[1]])
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    def _forward(self, rows: np.ndarray, start: int, kv_length: int) -> jax.Array:
        out, self.arena = self.runner.forward_paged(
            rows, np.array([start], np.int32), self.table, self.arena, kv_length)
        return out


class LocalModel:
    """Head, all blocks and tokenizer of one model, ready to generate."""

    def __init__(self, source: ModelSource, head: ClientHead, runner: SpanRunner) -> None:
        self.source = source
        self.head = head
        self.runner = runner

    @classmethod
    def load(
        cls, source: ModelSource, compute_dtype: Any = None, quantized: bool | None = None
    ) -> LocalModel:
        """``quantized``: keep block-quantized weights so (see ModelSource.load_span_params)."""
        dtype = default_compute_dtype() if compute_dtype is None else compute_dtype
        config = source.config
        head = ClientHead(config, source.load_client_params(dtype, quantized), dtype)
        span = source.load_span_params(0, config.num_layers, dtype, quantized)
        runner = SpanRunner(config, span, dtype)
        return cls(source, head, runner)

    def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        chat: bool = False,
        max_new_tokens: int = 64,
        sampling: SamplingOptions | None = None,
        on_token: Callable[[int], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> GenerationResult:
        """Generate from text (optionally through the chat template) or from ids."""
        tokenizer = self.source.tokenizer() if prompt_ids is None or on_text else None
        if prompt_ids is None:
            if prompt is None:
                raise ModelError("give a prompt or prompt ids")
            prompt_ids = prompt_token_ids(tokenizer, prompt, chat)
        ids = [int(i) for i in prompt_ids]
        stream = TextStream(self.source.tokenizer()) if on_text else None

        def emit(token: int) -> None:
            if on_token is not None:
                on_token(token)
            if stream is not None:
                piece = stream.push(token)
                if piece:
                    on_text(piece)

        blocks = LocalBlocks(self.runner, len(ids) + max_new_tokens)
        loop = generate_tokens(
            self.head,
            blocks,
            ids,
            max_new_tokens=max_new_tokens,
            sampler=Sampler(sampling or SamplingOptions()),
            stop_ids=self.stop_ids(),
            on_token=emit,
            clock=clock,
        )
        return GenerationResult(
            token_ids=loop.token_ids,
            text=self._text(loop.token_ids),
            prefill_s=loop.prefill_s,
            decode_tok_s=loop.decode_tok_s,
            stop_reason=loop.stop_reason,
            prompt_ids=tuple(ids),
        )

    def stop_ids(self) -> frozenset[int]:
        """EOS ids from the config, and from the tokenizer when it can be built."""
        ids = set(self.source.config.eos_token_ids)
        try:
            ids |= self.source.tokenizer().eos_ids
        except ModelError:
            pass
        return frozenset(ids)

    def _text(self, token_ids: Sequence[int]) -> str:
        try:
            return self.source.tokenizer().decode(token_ids)
        except ModelError:
            return ""


def generate_local(
    source: ModelSource, prompt: str | None = None, **options: Any
) -> GenerationResult:
    """Load ``source`` and generate once; see LocalModel.generate for the options."""
    return LocalModel.load(source).generate(prompt, **options)
