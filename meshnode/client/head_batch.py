"""Which of the waiting head calls run together: the client's batching rule, with no I/O.

Concurrent generations of one client process each hand the head one advance
per step (logits of the chain's output, the next token, the next input's
embedding). ``AdvanceQueue`` holds those that are waiting; whenever the head
is free, ``take`` hands out every waiting one (up to ``max_batch``, first come
first served) as one batch, and the head stays busy until the next ``take``
finds nothing. A lone generation is never held back: when the head is free,
its advance starts at once.

``rows_by_key`` groups the rows of a batch that can share one call (decode
inputs of one token, chain outputs of one dtype) and keeps the others apart.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class AdvanceQueue(Generic[T]):
    """Waiting items, handed out in batches of at most ``max_batch``, one batch at a time."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self._waiting: list[T] = []
        self.busy = False

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, item: T) -> bool:
        """Queue ``item``; True when the head is free, so the caller should ``take`` now."""
        self._waiting.append(item)
        return not self.busy

    def take(self) -> list[T]:
        """The next batch, oldest first; the head is busy until a ``take`` returns []."""
        batch = self._waiting[: self.max_batch]
        del self._waiting[: self.max_batch]
        self.busy = bool(batch)
        return batch


def rows_by_key(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key`` (None: alone), groups in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    alone: list[list[int]] = []
    for index, item in enumerate(items):
        k = key(item)
        if k is None:
            alone.append([index])
        else:
            groups.setdefault(k, []).append(index)
    return [*groups.values(), *alone]
