"""A paged KV cache shared by every session of a span, and its jitted step program.

The arena holds keys and values of the whole span in pages of ``PAGE``
positions: ``k, v [L, pages, P, K, D]``. A session owns a list of pages (its
page table); position ``p`` of a session lives at page ``table[p // P]``,
offset ``p % P``. Page ``SCRATCH_PAGE`` belongs to nobody: table entries past a
session's pages, and the rows that pad a batch up to its bucket, point there,
so padding is written and read there and never clobbers a real session.

``paged_step_function`` is the program ``SpanRunner.forward_paged`` runs:
``B`` rows of ``T`` new positions each, row ``b`` starting at its own position
``starts[b]`` with its own page table; every row is computed on its own (same
ops, same accumulation order per row), so a row's outputs do not depend on
what else shares its call. The arena is donated: use only the one returned.

    allocator = PageAllocator(arena.pages)
    cache = PagedCache(allocator, allocator.allocate(4))   # 4 pages = 256 positions
    tables = np.stack([cache.table(width)])                # int32 [B, M]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from meshnode.errors import CacheOverflow
from meshnode.model.layers.attention import SCRATCH_PAGE, PagedView

#: positions per page
PAGE = 64
__all__ = ["PAGE", "SCRATCH_PAGE", "PageAllocator", "PagedArena", "PagedCache", "pages_for",
           "paged_step_function"]


@dataclasses.dataclass(frozen=True)
class PagedArena:
    """Keys and values of blocks [start, start + L) in pages: each [L, pages, P, K, D]."""

    k: jax.Array
    v: jax.Array
    start: int

    @property
    def pages(self) -> int:
        return int(self.k.shape[1])

    @property
    def page_size(self) -> int:
        return int(self.k.shape[2])

    @property
    def num_layers(self) -> int:
        return int(self.k.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes) + int(self.v.nbytes)

    def lost(self) -> bool:
        """True when the buffers were donated to a call that failed (they are gone)."""
        return self.k.is_deleted() or self.v.is_deleted()


class PageAllocator:
    """The free pages of an arena (pure): every page but ``SCRATCH_PAGE`` is given out."""

    def __init__(self, pages: int):
        if pages < 2:
            raise ValueError("an arena needs its scratch page and at least one more")
        self.pages = pages
        #: goes up at each reset: pages given out before it are not given back twice
        self.generation = 0
        self._free = list(range(pages - 1, SCRATCH_PAGE, -1))  # pop() gives the lowest first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> tuple[int, ...]:
        """``count`` pages, or ``CacheOverflow`` and nothing taken."""
        if count > len(self._free):
            raise CacheOverflow(f"{count} pages asked, {len(self._free)} of {self.pages} free")
        return tuple(self._free.pop() for _ in range(count))

    def release(self, pages: tuple[int, ...], generation: int) -> None:
        """Give back pages taken in ``generation`` (a no-op once the allocator was reset)."""
        if generation == self.generation:
            self._free.extend(reversed(pages))

    def reset(self) -> None:
        """Every page free again (the arena was replaced); earlier pages are forgotten."""
        self.generation += 1
        self._free = list(range(self.pages - 1, SCRATCH_PAGE, -1))


class PagedCache:
    """One session's pages of an arena; ``release()`` gives them back (once)."""

    def __init__(self, allocator: PageAllocator, pages: tuple[int, ...], page_size: int = PAGE):
        self._allocator = allocator
        self.pages = pages
        self.page_size = page_size
        self.generation = allocator.generation
        self.released = False

    @property
    def max_length(self) -> int:
        return len(self.pages) * self.page_size

    def table(self, width: int) -> np.ndarray:
        """int32 [width]: this session's pages, then the scratch page."""
        table = np.full(width, SCRATCH_PAGE, np.int32)  # [M]
        table[: len(self.pages)] = self.pages
        return table

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._allocator.release(self.pages, self.generation)


def pages_for(positions: int, page_size: int = PAGE) -> int:
    return -(-positions // page_size)


@functools.lru_cache(maxsize=256)
def paged_step_function(keys: tuple[tuple[Any, Any, int, int], ...]):
    """The jitted paged step for programs of these structures (see SpanRunner._programs)."""

    def step(leaves, hidden, starts, tables, k_arena, v_arena, *, first: int, kv_length: int,
             compute_dtype: str):
        x = hidden.astype(compute_dtype)  # [B, T, H]
        positions = starts[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None]  # [B, T]
        view = PagedView(k_arena, v_arena, layer=first, first=first, tables=tables,
                         starts=starts, length=kv_length)
        for (graphdef, treedef, scanned, offset), program_leaves in zip(keys, leaves):
            state = jax.tree.unflatten(treedef, list(program_leaves))
            if not scanned:
                x, view = nnx.merge(graphdef, state)(x, positions, view)
                continue

            def body(carry, xs, graphdef=graphdef, view=view):
                x, k, v = carry
                layer_state, layer = xs
                block = nnx.merge(graphdef, layer_state)
                x, out = block(x, positions, dataclasses.replace(view, k=k, v=v, layer=layer))
                return (x, out.k, out.v), None

            layers = first + jnp.arange(offset, offset + scanned, dtype=jnp.int32)  # [L_run]
            (x, k, v), _ = lax.scan(body, (x, view.k, view.v), (state, layers))
            view = dataclasses.replace(view, k=k, v=v)
        return x, view.k, view.v

    return jax.jit(
        step,
        static_argnames=("first", "kv_length", "compute_dtype"),
        donate_argnames=("k_arena", "v_arena"),
    )
