"""``SpanCompute``: a worker's blocks, run by JAX on one dedicated thread.

Every JAX call (loading, cache allocation, forward) goes through one
``meshnode.compute.ComputeThread`` (the same piece the client's head uses): the
reactor thread never blocks on the model, and steps of different sessions run
one after another on the device, in the order they arrived. A session may cover
only part of the worker's span (a route may enter or leave it in the middle); a
runner per sub-span is built on first use from slices of the stacked parameters
and kept.

With ``enable_batching`` the sessions' caches are pages of one arena shared by
the whole span (``meshnode.worker.arena.SharedCache``), and steps run as the
iterations of a ``meshnode.worker.batching.BatchScheduler`` (``run_iteration``);
``batch_throughput`` holds the decode rate measured at a few batch sizes, for
routing to weigh a loaded worker against an idle one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from twisted.internet.defer import Deferred, fail, succeed

from meshnode.compute import ComputeThread
from meshnode.inference.records import BlockSpan
from meshnode.worker.precompile import session_cache_length

T = TypeVar("T")
#: positions of the prompt used to measure throughput at start
WARMUP_PREFILL = 16
WARMUP_DECODE_STEPS = 8
#: batch sizes whose decode rate is measured at start (``batch_throughput``)
MEASURED_BATCHES = (1, 4, 16)


class SpanCompute:
    """The model side of a worker: params of ``span`` and runners over its sub-spans."""

    def __init__(self, thread: ComputeThread, source: Any, span: BlockSpan, compute_dtype: Any,
                 metrics: Any = None):
        self._thread = thread
        # ``meshnode.worker.metrics.WorkerMetrics`` (None: not counted)
        self._metrics = metrics
        self._source = source
        self.span = span
        self.compute_dtype = compute_dtype
        self.hidden_size: int = source.config.hidden_size
        self._runners: dict[BlockSpan, Any] = {}
        #: the shared paged cache (``enable_batching``), None: one cache per session
        self.shared: Any = None
        #: failed iterations that took the shared cache with them (acknowledged here)
        self.cache_resets = 0
        #: batch size -> decode tokens/s over the whole span, measured at start
        self.batch_throughput: dict[int, float] = {}

    def call(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._thread.call(function, *args)

    def load(self) -> Deferred[None]:
        """Read the span's parameters (lazily, only these blocks) on the compute thread."""
        return self.call(self._load)

    def new_cache(self, span: BlockSpan, max_length: int) -> Deferred[Any]:
        length = session_cache_length(max_length)  # the programs compiled ahead: see precompile
        if self.shared is not None:
            try:
                return succeed(self.shared.new_cache(length))
            except Exception as exc:
                return fail(exc)
        return self.call(lambda: self._runner(span).new_cache(length))

    def enable_batching(self, cache_tokens: int, max_length: int) -> Deferred[None]:
        """Allocate the shared arena for ``cache_tokens`` positions, sessions of up to
        ``max_length``; from then on caches are pages and steps run by ``run_iteration``."""
        from meshnode.worker.arena import SharedCache

        def allocate() -> None:
            self.shared = SharedCache(self._runner, self.span, cache_tokens,
                                      session_cache_length(max_length), metrics=self._metrics)

        return self.call(allocate)

    def run_iteration(self, iteration: Any) -> Deferred[dict[Any, np.ndarray]]:
        """Every piece of a ``batching.Iteration`` over the shared cache."""
        done = self.call(self.shared.run, iteration)
        return done.addBoth(self._after_iteration)

    def _after_iteration(self, outcome: Any) -> Any:
        if self.shared.resets != self.cache_resets:
            self.shared.free_all()
            self.cache_resets = self.shared.resets
        return outcome

    def measure_batches(self, sizes: tuple[int, ...] = MEASURED_BATCHES,
                        steps: int = WARMUP_DECODE_STEPS) -> Deferred[dict[int, float]]:
        """Decode tokens/s of ``sizes`` rows batched, kept in ``batch_throughput``."""
        def measure() -> dict[int, float]:
            rates = {size: self.shared.measure(size, steps) for size in sizes}
            self.batch_throughput = rates
            return rates

        return self.call(measure)

    def forward(
        self, span: BlockSpan, hidden: np.ndarray, start: int, cache: Any
    ) -> Deferred[tuple[np.ndarray, Any]]:
        """New positions ``[1, T, H]`` through ``span``; the output keeps the input's dtype."""
        return self.call(self._forward, span, hidden, start, cache)

    def warm_up(self, max_length: int) -> Deferred[None]:
        """Compile the step programs before the first session needs them."""
        return self.call(self._warm_up, max_length)

    def measure_throughput(self) -> Deferred[float]:
        """Tokens per second through the whole span, decoding after a short prefill."""
        return self.call(self._measure_throughput)

    def _load(self) -> None:
        from meshnode.model.span import SpanRunner

        # The host copy of the weights is dropped once the runner holds them on the device.
        params = self._source.load_span_params(self.span.start, self.span.end, self.compute_dtype)
        self._runners[self.span] = SpanRunner(self._source.config, params, self.compute_dtype)

    def runner(self, span: BlockSpan) -> Any:
        """The runner of ``span`` (built on first use); call it on the compute thread."""
        return self._runner(span)

    def _runner(self, span: BlockSpan) -> Any:
        runner = self._runners.get(span)
        if runner is None:
            runner = self._runners[self.span].sub_runner(span.start, span.end)
            self._runners[span] = runner
        return runner

    def _forward(
        self, span: BlockSpan, hidden: np.ndarray, start: int, cache: Any
    ) -> tuple[np.ndarray, Any]:
        began = time.perf_counter()
        wire_dtype = hidden.dtype
        # numpy -> jax: zero copy when the wire's buffer is aligned and already f32
        x = hidden if hidden.dtype == np.float32 else hidden.astype(np.float32)
        out, cache = self._runner(span).forward(x, start, cache)
        out = np.asarray(out)  # [1, T, H]
        if out.dtype != wire_dtype:
            out = out.astype(wire_dtype)
        if self._metrics is not None:
            rows, positions = hidden.shape[0], hidden.shape[0] * hidden.shape[1]
            self._metrics.forward_done(rows, positions, time.perf_counter() - began)
        return out, cache

    def _warm_up(self, max_length: int) -> None:
        self._measure_throughput(steps=2)

    def _measure_throughput(self, steps: int = WARMUP_DECODE_STEPS) -> float:
        runner = self._runner(self.span)
        cache = runner.new_cache(session_cache_length(WARMUP_PREFILL + steps + 1))
        rng = np.random.default_rng(0)
        prompt = rng.standard_normal((1, WARMUP_PREFILL, self.hidden_size)).astype(np.float32)
        out, cache = runner.forward(prompt, 0, cache)
        token = np.asarray(out)[:, -1:, :]
        out, cache = runner.forward(token, WARMUP_PREFILL, cache)  # compile the decode shape
        np.asarray(out)
        began = time.perf_counter()
        for step in range(1, steps):
            out, cache = runner.forward(token, WARMUP_PREFILL + step, cache)
            token = np.asarray(out)
        elapsed = time.perf_counter() - began
        return (steps - 1) / max(elapsed, 1e-9)
