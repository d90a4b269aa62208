"""Next-token choice from float32 logits: greedy, or temperature / top-k / top-p sampling.

Runs on the host in numpy (one vector of logits per step). Filters apply in
transformers' order: temperature, then top-k, then top-p. A seeded Sampler
draws the same tokens for the same logits, run after run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from meshnode.errors import ModelError


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no filter."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ModelError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ModelError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ModelError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Chooses tokens for one generation; holds the random state."""

    def __init__(self, options: SamplingOptions = SamplingOptions()) -> None:
        self.options = options
        self._rng = np.random.default_rng(options.seed)

    def __call__(self, logits: Any) -> int:
        """logits [V] (or [1, V]) -> the chosen token id."""
        scores = np.asarray(logits, dtype=np.float32).reshape(-1)  # [V]
        if self.options.greedy:
            return int(np.argmax(scores))
        return int(self._draw(filtered_probabilities(scores, self.options)))

    def _draw(self, probs: np.ndarray) -> int:
        # inverse-CDF draw: one uniform number per step, so the stream is reproducible
        cdf = np.cumsum(probs, dtype=np.float64)  # [V]
        point = self._rng.random() * cdf[-1]
        return int(min(np.searchsorted(cdf, point, side="right"), len(cdf) - 1))


def filtered_probabilities(scores: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """Probabilities [V] after temperature, top-k and top-p; zeros outside the kept set."""
    scores = scores / np.float32(options.temperature)  # [V]
    if 0 < options.top_k < scores.size:
        kth = np.partition(scores, -options.top_k)[-options.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())  # [V]
    probs /= probs.sum()
    if options.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # [V]
        cumulative = np.cumsum(probs[order])  # [V]
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = cumulative - probs[order] < options.top_p  # [V]
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs
