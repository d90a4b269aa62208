"""Measuring a worker process's memory: RSS, hosted weights, cache budget; session churn.

Shared by ``test_memory.py`` and ``scripts/bench_memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
from twisted.internet.defer import Deferred, DeferredList

from meshnode.client.chain import InferenceChain
from meshnode.client.routing.route import Route
from meshnode.inference.records import BlockSpan
from tests.resilience.resilience_helpers import pinned_hop

MIB = 1024 * 1024
#: (prompt positions, session max length) cycled through by ``churn``: every shape a
#: worker compiles for is met in the first few sessions
SHAPES = ((5, 32), (12, 64), (3, 32), (20, 64))
DECODE_STEPS = 2


def rss(pid: int) -> int:
    """Resident bytes of process ``pid``."""
    return psutil.Process(pid).memory_info().rss


@dataclass(frozen=True)
class Footprint:
    """What a worker may hold: its weights and the cache of its whole token budget."""

    weights_bytes: int
    cache_bytes_per_token: int
    cache_tokens: int

    @property
    def cache_budget_bytes(self) -> int:
        return self.cache_bytes_per_token * self.cache_tokens


def footprint(source: Any, span: BlockSpan, cache_tokens: int) -> Footprint:
    """Weights of ``span``'s blocks as a worker holds them (float32 on CPU), and the KV bytes
    of one cached token over the span."""
    params = source.load_span_params(span.start, span.end, "float32")
    config = source.config
    per_token = span.length * 2 * config.num_kv_heads * config.head_dim * 4
    return Footprint(params.nbytes, per_token, cache_tokens)


def direct_route(address: Any, span: BlockSpan, model: str) -> Route:
    """A one-hop route to the worker at ``address`` over ``span``."""
    return Route((pinned_hop(address, span, span, model),), 0.0)


async def one_session(
    endpoint: Any, route: Route, model: str, hidden_size: int, index: int, timeout: float
) -> None:
    """Open, prefill, decode a few steps, close: one session of ``SHAPES[index]``."""
    prompt, max_length = SHAPES[index % len(SHAPES)]
    rng = np.random.default_rng(index)
    chain = InferenceChain(endpoint, route, model, max_length, timeout)
    await chain.open()
    try:
        await chain.forward(rng.standard_normal((1, prompt, hidden_size)).astype(np.float32))
        for _ in range(DECODE_STEPS):
            await chain.forward(rng.standard_normal((1, 1, hidden_size)).astype(np.float32))
    finally:
        await chain.close()


async def churn(
    endpoint: Any,
    route: Route,
    model: str,
    hidden_size: int,
    first: int,
    count: int,
    concurrency: int = 8,
    timeout: float = 60.0,
) -> None:
    """Sessions ``first .. first + count - 1``, ``concurrency`` at a time; raises on failure."""
    for start in range(first, first + count, concurrency):
        batch = range(start, min(start + concurrency, first + count))
        await DeferredList(
            [
                Deferred.fromCoroutine(one_session(endpoint, route, model, hidden_size, i, timeout))
                for i in batch
            ],
            fireOnOneErrback=True,
            consumeErrors=True,
        ).addErrback(lambda failure: failure.value.subFailure)
