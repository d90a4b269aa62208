"""Step programs a worker compiles in the background once it serves, and the thread doing it.

A session's programs are fixed by its shapes: a prefill of ``T`` positions
(padded to a bucket) and decode steps, each over a cache of ``C`` positions
(``cache_length(prompt + new tokens)``) attending to a bucketed prefix of it.
The first session of a new prompt length would otherwise compile its
programs while the client waits for its first token (seconds per program on a
small CPU). Caches are allocated at least ``MIN_SESSION_CACHE`` long
(``session_cache_length``), so every session up to that length runs one of a
dozen programs whatever its prompt and new tokens; ``step_shapes`` lists them
and ``Precompiler`` runs one dummy forward per program on a thread of its
own, so the compute thread's steps are never queued behind a compilation. What is compiled lands
in the persistent compilation cache too, so a restarted worker only loads it.

A batching worker runs other programs (meshnode/worker/batching.py): decode
rows padded to a row bucket, over the whole page table, and prefill chunks of
a length bucket attending to a bucketed prefix (or, where the native kernel
reads each query's own prefix, over the whole table: one program a chunk
length instead of one per length and prefix). ``paged_shapes`` lists them
(decode buckets and short prompts first), and ``Precompiler.run_paged``
compiles each ahead of time from shapes alone (``SpanRunner.compile_paged``:
no arena is allocated, and the first call finds the program in the cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

#: a session's cache is never allocated shorter than this (positions): every session of up
#: to this many positions then runs the same programs, compiled once, ahead
MIN_SESSION_CACHE = 256


def session_cache_length(max_length: int) -> int:
    """Cache positions a worker allocates (and reserves) for a session of ``max_length``."""
    from meshnode.model.span import cache_length

    return cache_length(max(max_length, MIN_SESSION_CACHE))


@dataclass(frozen=True, order=True)
class StepShape:
    """One step program: ``positions`` new positions from ``start`` over a ``cache``-long cache."""

    cache: int
    positions: int
    start: int


def step_shapes(max_length: int) -> list[StepShape]:
    """Every prefill and decode program of sessions of up to ``MIN_SESSION_CACHE``
    positions (all share one cache length), within the worker's ``max_length`` (pure)."""
    from meshnode.model.buckets import LENGTH_BUCKETS, bucket_length

    cache = session_cache_length(1)
    longest = min(cache, bucket_length(max_length))
    prefills = [StepShape(cache, b, 0) for b in LENGTH_BUCKETS if b <= longest]
    # a decode step at position p attends to the bucket of p + 1: one program per bucket
    decodes = [StepShape(cache, 1, b - 1) for b in LENGTH_BUCKETS if 1 < b <= longest]
    return decodes[:1] + prefills + decodes[1:]


@dataclass(frozen=True)
class PagedShape:
    """One paged program: ``batch`` rows of ``positions`` attending to ``kv_length``."""

    batch: int
    positions: int
    kv_length: int


def paged_shapes(table_positions: int, prefix_free: bool = False) -> list[PagedShape]:
    """Every program of a batching worker whose page tables span ``table_positions`` (pure):
    decode rows of each row bucket, chunks of each length bucket at each prefix bucket (with
    ``prefix_free``, ``SpanRunner.prefix_free``: over the whole table, one a length)."""
    from meshnode.compute import ROW_BUCKETS
    from meshnode.model.buckets import CHUNK, LENGTH_BUCKETS, bucket_length

    decodes = [PagedShape(b, 1, table_positions) for b in ROW_BUCKETS]
    lengths = [b for b in LENGTH_BUCKETS if 1 < b <= min(CHUNK, table_positions)]
    if prefix_free:
        chunks = [PagedShape(1, t, table_positions) for t in lengths]
        return decodes[:5] + chunks + decodes[5:]
    first = [PagedShape(1, t, bucket_length(t)) for t in lengths]
    prefixes = sorted({min(bucket_length(start + t), table_positions)
                       for start in range(CHUNK, table_positions, CHUNK) for t in lengths})
    later = [PagedShape(1, t, kv) for kv in prefixes for t in lengths if kv > CHUNK]
    return decodes[:5] + first + decodes[5:] + later


class Precompiler:
    """Compiles step programs of a runner on its own thread; stopping waits for the one
    in flight."""

    def __init__(self, reactor: Any, name: str = "meshnode-precompile"):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._stopped = False

    def run(self, runner: Any, hidden_size: int, shapes: list[StepShape],
            clock: Callable[[], float] = time.monotonic) -> Deferred[float]:
        """Compile ``shapes`` one after the other; fires with the seconds it took."""
        self._pool.start()
        return deferToThreadPool(
            self._reactor, self._pool, self._compile_all, runner, hidden_size, shapes, clock
        )

    def run_paged(self, runner: Any, shapes: list[PagedShape], width: int, pages: int,
                  clock: Callable[[], float] = time.monotonic) -> Deferred[float]:
        """Compile the paged programs ``shapes`` for page tables of ``width`` pages over an
        arena of ``pages``; fires with the seconds it took."""
        def compile_all() -> float:
            began = clock()
            for shape in shapes:
                if self._stopped:
                    break
                runner.compile_paged(shape.batch, shape.positions, width, pages, shape.kv_length)
            return clock() - began

        self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, compile_all)

    def stop(self) -> None:
        self._stopped = True
        if self._pool.started:
            self._pool.stop()

    def _compile_all(self, runner: Any, hidden_size: int, shapes: list[StepShape],
                     clock: Callable[[], float]) -> float:
        began = clock()
        for shape in shapes:
            if self._stopped:
                break
            cache = runner.new_cache(shape.cache)
            hidden = np.zeros((1, shape.positions, hidden_size), np.float32)  # [1, T, H]
            out, _ = runner.forward(hidden, shape.start, cache)
            np.asarray(out)
        return clock() - began
