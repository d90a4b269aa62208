"""Many concurrent generations through one client: tokens, timings, per-token latencies.

Shared by ``test_load.py`` and ``scripts/bench_load.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import DeferredList

from meshnode.client.generate import GenerationOptions


@dataclass
class LoadResult:
    """Every generation's tokens, and the time between consecutive tokens of each."""

    tokens: list[list[int]] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.total_tokens / self.seconds if self.seconds > 0 else 0.0

    def gap_percentile(self, fraction: float) -> float:
        """Seconds per token (decode steps) at ``fraction`` (0.5: median)."""
        ordered = sorted(self.gaps)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


async def run_load(client: Any, clock: Any, batch: list[list[int]], new_tokens: int) -> LoadResult:
    """Generate greedily from every prompt of ``batch`` at once; fails if any generation does."""
    result = LoadResult()
    options = GenerationOptions(max_new_tokens=new_tokens)
    last_seen: list[float | None] = [None] * len(batch)

    def on_token(index: int):
        def seen(_token: int) -> None:
            now = clock.seconds()
            if last_seen[index] is not None:
                result.gaps.append(now - last_seen[index])
            last_seen[index] = now

        return seen

    began = clock.seconds()
    running = [client.generate_ids(ids, options, on_token(i)) for i, ids in enumerate(batch)]
    outcomes = await DeferredList(running, fireOnOneErrback=True, consumeErrors=True).addErrback(
        lambda failure: failure.value.subFailure
    )
    result.seconds = clock.seconds() - began
    result.tokens = [list(generated.token_ids) for _, generated in outcomes]
    return result
