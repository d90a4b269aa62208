"""``CacheBudget``: how many KV-cache tokens a worker may hold across all sessions.

A session reserves its whole ``max_length`` when it opens (the cache is
allocated up front), and gives it back when it closes or times out. Pure: no
clock, no network.
"""

from __future__ import annotations

from meshnode.errors import NoCapacity


class CacheBudget:
    """A counter of cache tokens with an upper bound; over-reservation is ``NoCapacity``."""

    def __init__(self, total_tokens: int):
        if total_tokens <= 0:
            raise ValueError("a cache budget needs a positive number of tokens")
        self.total = total_tokens
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.total - self._used

    def reserve(self, tokens: int) -> None:
        """Take ``tokens`` from the budget, or raise ``NoCapacity`` and take nothing."""
        if tokens <= 0:
            raise ValueError("reserve a positive number of tokens")
        if tokens > self.free:
            raise NoCapacity(f"{tokens} cache tokens asked, {self.free} of {self.total} free")
        self._used += tokens

    def release(self, tokens: int) -> None:
        """Give back tokens taken by ``reserve``."""
        if tokens <= 0 or tokens > self._used:
            raise ValueError(f"cannot release {tokens} of {self._used} used tokens")
        self._used -= tokens
