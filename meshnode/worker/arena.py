"""``SharedCache``: the worker's paged KV cache, and the forwards of one iteration over it.

One arena of pages (meshnode/model/paged.py) over the worker's whole span holds
the caches of all its sessions; a session's pages are taken when it opens (its
``PagedCache``) and given back when it is freed. The cache-token budget
(``CacheBudget``) is what admits a session: the arena has a page for every
budget token (plus the scratch page), and sessions reserve whole pages, so an
admitted session always finds its pages.

``run(iteration)`` runs on the compute thread: each sub-span's decode rows as
one forward ``[B, 1, H]`` (B padded to a row bucket with scratch rows), then
each prefill chunk as its own forward ``[1, t, H]`` (t padded to a length
bucket), and returns every piece's output in its step's wire dtype. A decode
forward attends through the native kernel (or over each row's whole page
table), a chunk over its session's positions so far rounded up to a length
bucket: nothing a row computes depends on the other rows or on the size of
the batch.

A failed forward may have consumed the arena (it is donated to every call):
then a new, zeroed arena replaces it, ``resets`` goes up, every page is
made free again (``free_all``, on the reactor thread, which alone touches the
allocator), and the scheduler closes every session (their caches are gone;
clients replay them elsewhere or here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from twisted.python.failure import Failure

from meshnode.compute import row_bucket
from meshnode.errors import CacheOverflow, NoCapacity
from meshnode.model.buckets import chunk_shape
from meshnode.model.paged import PAGE, PageAllocator, PagedCache, pages_for
from meshnode.worker.batching import Iteration, Work


class SharedCache:
    """The arena of a worker's span, its free pages, and how iterations run over it."""

    def __init__(self, runner_of: Callable[[Any], Any], span: Any, cache_tokens: int,
                 max_length: int, page_size: int = PAGE, metrics: Any = None):
        self._runner_of = runner_of  # BlockSpan -> SpanRunner (sub-runners share weights)
        self.span = span
        self.page_size = page_size
        self.pages = pages_for(cache_tokens, page_size) + 1  # + the scratch page
        #: page-table width: the pages of the longest session the worker accepts
        self.width = pages_for(max_length, page_size)
        self._metrics = metrics
        self.resets = 0
        self._resets_seen = 0  # resets when the running iteration began
        self.arena = runner_of(span).new_arena(self.pages, page_size)
        self.allocator = PageAllocator(self.pages)

    @property
    def nbytes(self) -> int:
        return self.arena.nbytes

    def new_cache(self, positions: int) -> PagedCache:
        """A session's pages for ``positions`` (``NoCapacity`` when the arena lacks them)."""
        try:
            pages = self.allocator.allocate(pages_for(positions, self.page_size))
        except CacheOverflow as exc:
            raise NoCapacity(f"no free cache pages: {exc}") from None
        return PagedCache(self.allocator, pages, self.page_size)

    def run(self, iteration: Iteration) -> dict[Work, Any]:
        """Every piece of ``iteration`` -> its output [1, t, H]; on the compute thread.

        A forward that fails with the arena intact fails only its own pieces (their value is
        the ``Failure``); one that took the arena with it fails the whole iteration."""
        self._resets_seen = self.resets
        outputs: dict[Work, Any] = {}
        for span, works in iteration.rows.items():
            outputs.update(self._guarded(works, lambda span=span, works=works: self._rows(
                span, works)))
        for work in iteration.chunks:
            outputs.update(self._guarded([work], lambda work=work: self._chunk(work)))
        return outputs

    def _rows(self, span: Any, works: list[Work]) -> dict[Work, np.ndarray]:
        out = self._forward(span, [w.hidden() for w in works], works, 1,
                            self.width * self.page_size)  # [Bp, 1, H]
        return {work: self._wire(out[i : i + 1], work) for i, work in enumerate(works)}

    def _chunk(self, work: Work) -> dict[Work, np.ndarray]:
        span = work.job.session.span
        padded, kv_length = chunk_shape(work.start, work.length, self.width * self.page_size,
                                        self._runner_of(span).prefix_free)
        out = self._forward(span, [work.hidden()], [work], padded, kv_length)
        return {work: self._wire(out[:, : work.length], work)}

    def _guarded(self, works: list[Work], forward: Callable[[], dict[Work, np.ndarray]]
                 ) -> dict[Work, Any]:
        try:
            return forward()
        except Exception:
            if self.resets != self._resets_seen:
                raise  # the arena went with it: nothing of this iteration stands
            failure = Failure()
            return {work: failure for work in works}

    def measure(self, rows: int, steps: int, span: Any = None) -> float:
        """Decode tokens per second of ``rows`` sessions batched (scratch pages only).

        The rows hold random states and the bucket's padding rows zeros, as in a real
        iteration: the matmuls leave zero rows out (meshnode/native/rows.h)."""
        width = self._runner_of(self.span).config.hidden_size
        rows_in = np.zeros((row_bucket(rows), 1, width), np.float32)  # [Bp, 1, H]
        rows_in[:rows] = np.random.default_rng(0).standard_normal((rows, 1, width))
        tables = np.full((row_bucket(rows), self.width), 0, np.int32)  # [Bp, M]
        starts = np.zeros(row_bucket(rows), np.int32)  # [Bp]
        self._call(span or self.span, rows_in, starts, tables, self.width * self.page_size)
        began = time.perf_counter()
        for _ in range(steps):
            self._call(span or self.span, rows_in, starts, tables, self.width * self.page_size)
        return rows * steps / max(time.perf_counter() - began, 1e-9)

    def _forward(self, span: Any, pieces: list[np.ndarray], works: list[Work], length: int,
                 kv_length: int) -> np.ndarray:
        """Pieces [1, t <= length, H] as one forward of B = row bucket rows -> [B, length, H]."""
        batch = row_bucket(len(pieces)) if length == 1 else len(pieces)
        width = pieces[0].shape[2]
        hidden = np.zeros((batch, length, width), np.float32)  # [B, T, H]
        starts = np.zeros(batch, np.int32)  # [B]; padding rows: scratch page, position 0
        tables = np.zeros((batch, self.width), np.int32)  # [B, M]
        for i, (piece, work) in enumerate(zip(pieces, works)):
            hidden[i, : piece.shape[1]] = piece[0]
            starts[i] = work.start
            tables[i] = work.job.session.cache.table(self.width)
        began = time.perf_counter()
        out = self._call(span, hidden, starts, tables, kv_length)
        if self._metrics is not None:
            positions = sum(piece.shape[1] for piece in pieces)
            self._metrics.forward_done(len(pieces), positions, time.perf_counter() - began)
        return out

    def _call(self, span: Any, hidden: np.ndarray, starts: np.ndarray, tables: np.ndarray,
              kv_length: int) -> np.ndarray:
        try:
            out, self.arena = self._runner_of(span).forward_paged(
                hidden, starts, tables, self.arena, kv_length)
            return np.asarray(out)
        except Exception:
            if self.arena.lost():
                self._reset()
            raise

    def _reset(self) -> None:
        """A new zeroed arena: the old one went with a failed call (``free_all`` then runs
        on the reactor thread, which owns the allocator)."""
        self.resets += 1
        self.arena = self._runner_of(self.span).new_arena(self.pages, self.page_size)

    def free_all(self) -> None:
        """Every page free again, after a reset (pages held before it are forgotten)."""
        self.allocator.reset()

    @staticmethod
    def _wire(out: np.ndarray, work: Work) -> np.ndarray:
        dtype = work.job.hidden.dtype
        return out if out.dtype == dtype else out.astype(dtype)
