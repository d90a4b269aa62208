"""Generation through the mesh: the model engine's loop with a remote forward.

``meshnode.model.decoding.generate_tokens`` is the one generation loop (local
and mesh share its stopping rule and timings). It is synchronous, so it runs on
a client loop thread; its ``forward`` is ``RemoteBlocks``, which hands each
step to the reactor thread (``blockingCallFromThread``) to go through the
``InferenceChain`` and waits for the answer. The head's JAX work (embed,
logits) thus stays off the reactor thread too. Hidden states travel in the
head's compute dtype (float32 on CPU, bfloat16 on accelerators, as local
generation computes), so the mesh's tokens are the local ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread

from meshnode.client.chain import InferenceChain
from meshnode.client.routing.route import Route
from meshnode.errors import ClientError
from meshnode.inference.messages import WIRE_FLOAT_DTYPES
from meshnode.model.decoding import GenerationResult, generate_tokens
from meshnode.model.sampling import Sampler, SamplingOptions

DEFAULT_MAX_NEW_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """The options of ``meshnode generate``, local or mesh."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    chat: bool = False
    system: str | None = None


@dataclasses.dataclass(frozen=True)
class MeshGenerationResult(GenerationResult):
    """A generation's result, plus the route it went through."""

    route: tuple[dict, ...] = ()

    def as_json(self) -> dict:
        return super().as_json() | {"route": list(self.route)}


class RemoteBlocks:
    """``forward(hidden [1, T, H], start_position)`` through a chain; called off the reactor."""

    def __init__(self, reactor: Any, chain: InferenceChain):
        self._reactor = reactor
        self._chain = chain

    def __call__(self, hidden: Any, start_position: int) -> np.ndarray:
        if start_position != self._chain.position:
            raise ClientError(
                f"step at {start_position}, but the chain is at {self._chain.position}"
            )
        x = np.ascontiguousarray(np.asarray(hidden))  # [1, T, H]
        if x.dtype.name not in WIRE_FLOAT_DTYPES:
            x = x.astype(np.float32)
        return blockingCallFromThread(
            self._reactor, lambda: Deferred.fromCoroutine(self._chain.forward(x))
        )


def run_generation(
    reactor: Any,
    head: Any,
    chain: InferenceChain,
    prompt_ids: list[int],
    options: GenerationOptions,
    stop_ids: frozenset[int],
    on_token: Callable[[int], None] | None = None,
) -> Any:
    """The generation loop over ``chain``; call it on a loop thread, never the reactor's."""
    return generate_tokens(
        head,
        RemoteBlocks(reactor, chain),
        prompt_ids,
        max_new_tokens=options.max_new_tokens,
        sampler=Sampler(options.sampling),
        stop_ids=stop_ids,
        on_token=on_token,
    )


def mesh_result(
    loop_result: Any, text: str, prompt_ids: list[int], route: Route
) -> MeshGenerationResult:
    return MeshGenerationResult(
        token_ids=loop_result.token_ids,
        text=text,
        prefill_s=loop_result.prefill_s,
        decode_tok_s=loop_result.decode_tok_s,
        stop_reason=loop_result.stop_reason,
        prompt_ids=tuple(prompt_ids),
        route=tuple(route.describe()),
    )
