"""A lying worker, for tests of verified outputs: noisy span outputs, inflated throughput.

``install(noise, inflate)`` patches ``SpanCompute`` (and, for batching
workers, ``SharedCache``'s iterations) in this process so that every span
output gets Gaussian noise of ``noise`` times the output's own
standard deviation, and the throughput measured at start-up (and announced)
is multiplied by ``inflate``. ``LocalMesh.start_worker(..., liar=(noise,
inflate))`` starts a worker process with it installed. Nothing deployed
imports this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the issue's experiment: noise of the outputs' own scale, 20x announced speed
DEFAULT_NOISE = 1.0
DEFAULT_INFLATE = 20.0


def install(noise: float = DEFAULT_NOISE, inflate: float = DEFAULT_INFLATE,
            seed: int = 0) -> None:
    """Make every ``SpanCompute`` of this process lie (see the module docstring)."""
    from meshnode.worker.arena import SharedCache
    from meshnode.worker.compute import SpanCompute

    rng = np.random.default_rng(seed)
    honest_forward = SpanCompute._forward
    honest_measure = SpanCompute._measure_throughput
    honest_run = SharedCache.run

    def noisy(out: np.ndarray) -> np.ndarray:
        scale = float(np.std(out.astype(np.float32))) or 1.0
        lie = out.astype(np.float32) + noise * scale * rng.standard_normal(out.shape)  # [1, T, H]
        return lie.astype(out.dtype)

    def noisy_forward(self: Any, span: Any, hidden: np.ndarray, start: int,
                      cache: Any) -> tuple[np.ndarray, Any]:
        out, cache = honest_forward(self, span, hidden, start, cache)
        return noisy(out), cache

    def noisy_run(self: Any, iteration: Any) -> dict:
        outputs = honest_run(self, iteration)
        return {work: noisy(out) if isinstance(out, np.ndarray) else out
                for work, out in outputs.items()}

    def inflated_measure(self: Any, *args: Any, **kwargs: Any) -> float:
        return honest_measure(self, *args, **kwargs) * inflate

    SpanCompute._forward = noisy_forward
    SharedCache.run = noisy_run
    SpanCompute._measure_throughput = inflated_measure
