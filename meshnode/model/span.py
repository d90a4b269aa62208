"""The span runner: blocks [start, end) over a fixed-size, donated KV cache.

The blocks are Flax NNX modules composed per family (meshnode/model/families/)
from the generic layers (meshnode/model/layers/). The runner builds them once,
``nnx.split``s them once, and runs a pure ``jax.jit``-ed function of (state
leaves, hidden, start, cache) that merges the state back inside the trace:
the weights are jit arguments, never static, the cache is donated, and a call
pays no NNX bookkeeping (``nnx.jit`` would cost 25-34 ms a call).

On CPU the layers are unrolled over each layer's own device arrays (scan's
per-layer weight slices are copies there: decode ran 2x slower), so layers
may differ in form (some weights quantized, some not). On accelerators runs
of consecutive layers of the same kind (Gemma 3's local layers between its
global ones are two kinds) are stacked on a leading axis and run with
``lax.scan``: one compiled layer per kind whatever the span length. The runner
keeps only the device copy of the weights, and ``sub_runner`` serves any part
of the span from that same copy; ``module`` is the span as an ordinary NNX
module (a ``DecoderStack``) for use in other Flax code.
Shapes stay static: the cache is allocated once at its max
length rounded up to a bucket; prefill lengths are padded to a bucket (the pad
positions are written past the real ones and never attended to before being
overwritten); attention reads only a bucketed prefix of the cache.

    runner = SpanRunner(config, source.load_span_params(0, 30, np.float32))
    cache = runner.new_cache(max_length=512)
    hidden, cache = runner.forward(embedded, start_position=0, cache=cache)   # prefill
    hidden, cache = runner.forward(next_embedded, start_position=n, cache=cache)

Many sessions at different positions share one paged arena instead
(meshnode/model/paged.py): ``new_arena(pages)`` allocates it over this span,
``forward_paged`` runs B rows, each at its own start with its own page table,
and any sub-runner writes its own layers of the same arena.

    arena = runner.new_arena(pages=257)
    hidden, arena = runner.forward_paged(rows, starts, tables, arena)   # rows [B, T, H]
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

from meshnode.errors import CacheOverflow, ShapeMismatch
from meshnode.model import quant
from meshnode.model.buckets import CACHE_BUCKET, bucket_length
from meshnode.model.config import ModelConfig
from meshnode.model.families.llama import attention_spec
from meshnode.model.families.registry import build_stack, family
from meshnode.model.layers.attention import CacheView, native_attention
from meshnode.model.layers.block import DecoderStack, positions_from
from meshnode.model.paged import PAGE, PagedArena, paged_step_function
from meshnode.model.quant import is_quantized


def cache_length(max_length: int) -> int:
    """Cache positions to allocate for sequences up to max_length."""
    if max_length < 1:
        raise CacheOverflow(f"max_length must be positive, got {max_length}")
    if max_length <= CACHE_BUCKET:
        return max(16, 1 << (max_length - 1).bit_length())
    return -(-max_length // CACHE_BUCKET) * CACHE_BUCKET


@dataclasses.dataclass(frozen=True)
class SpanParams:
    """Blocks [start, end): one parameter dict per block (see meshnode/model/layers.py)."""

    start: int
    end: int
    layers: tuple[dict[str, Any], ...]

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for layer in self.layers for a in layer.values())

    def stacked(self) -> dict[str, Any]:
        """Each parameter on a leading [num_layers] axis, as lax.scan takes them; a weight
        whose blocks differ in form (quantized or not, bits) is stacked as float."""
        stacked: dict[str, Any] = {}
        for name in self.layers[0]:
            values = [layer[name] for layer in self.layers]
            same = quant.stack(values) if all(is_quantized(v) for v in values) else None
            if same is not None:
                stacked[name] = same
                continue
            dtype = next((v.dtype for v in values if not is_quantized(v)), np.float32)
            stacked[name] = np.stack(
                [v.dequantize().T.astype(dtype) if is_quantized(v) else v for v in values]
            )
        return stacked


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of one session on one span: each [L, B, S, K, D]."""

    k: jax.Array
    v: jax.Array

    @property
    def max_length(self) -> int:
        return int(self.k.shape[2])

    @property
    def batch(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes) + int(self.v.nbytes)


class SpanRunner:
    """Runs blocks [params.start, params.end) of a model, one session cache at a time."""

    def __init__(
        self,
        config: ModelConfig,
        params: SpanParams,
        compute_dtype: Any = jnp.float32,
        scan: bool | None = None,
    ) -> None:
        scan = jax.default_backend() != "cpu" if scan is None else scan
        if scan:
            programs = tuple(
                _Program.of(
                    family(config).build_block(
                        config, params.start + i, SpanParams(i, j, params.layers[i:j]).stacked()
                    ),
                    scanned=j - i,
                    first=i,
                )
                for i, j in _runs(config, params.start, params.end)
            )
        else:
            stack = build_stack(config, params.start, params.layers)
            programs = (_Program.of(stack),)
        self._setup(config, params.start, params.end, compute_dtype, programs)

    def _setup(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        compute_dtype: Any,
        programs: tuple[_Program, ...],
    ) -> None:
        self.config = config
        self.start, self.end = start, end
        self.num_layers = end - start
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.scan = programs[0].scanned > 0
        self._programs = programs  # device arrays: one stack (unrolled) or one per run (scan)
        self._step = _step_function(tuple(p.key for p in programs))
        self._paged_step = paged_step_function(tuple(p.key for p in programs))

    @property
    def prefix_free(self) -> bool:
        """True when paged attention goes to the native kernel (float32, no score softcap):
        each query then reads exactly its causal prefix, and ``forward_paged``'s kv_length
        changes nothing it computes (one program per chunk length, not per prefix)."""
        return native_attention(self.compute_dtype, self.config.attn_softcap)

    @property
    def module(self) -> nnx.Module:
        """The blocks as one NNX module (a DecoderStack over the device weights; for scan
        layouts, one stacked block per run of layers of the same kind)."""
        if not self.scan:
            return self._programs[0].module()
        return DecoderStack([p.module() for p in self._programs])

    def sub_runner(self, start: int, end: int) -> SpanRunner:
        """Blocks [start, end) of this span, sharing this runner's device weights."""
        if not self.start <= start < end <= self.end:
            raise ShapeMismatch(
                f"blocks {start}:{end} are not inside this runner's {self.start}:{self.end}"
            )
        i, j = start - self.start, end - self.start
        if self.scan:
            programs = tuple(
                p.slice(max(i, p.first), min(j, p.first + p.scanned), i)
                for p in self._programs
                if p.first < j and i < p.first + p.scanned
            )
        else:
            blocks = list(self._programs[0].module().blocks)[i:j]
            programs = (_Program.of(DecoderStack(blocks), device=False),)
        runner = object.__new__(SpanRunner)
        runner._setup(self.config, start, end, self.compute_dtype, programs)
        return runner

    def new_cache(self, max_length: int, batch: int = 1) -> KVCache:
        """A zeroed cache for sequences up to max_length positions, rounded to a bucket."""
        c = self.config
        shape = (
            self.num_layers,
            batch,
            cache_length(max_length),
            c.num_kv_heads,
            c.head_dim,
        )
        return KVCache(jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype))

    def cache_bytes(self, max_length: int, batch: int = 1) -> int:
        """What new_cache(max_length, batch) would allocate."""
        c = self.config
        positions = cache_length(max_length)
        per_position = 2 * c.num_kv_heads * c.head_dim * self.compute_dtype.itemsize
        return self.num_layers * batch * positions * per_position

    def new_arena(self, pages: int, page_size: int = PAGE) -> PagedArena:
        """A zeroed paged arena of ``pages`` pages (page 0 being scratch) over this span."""
        c = self.config
        shape = (self.num_layers, pages, page_size, c.num_kv_heads, c.head_dim)
        return PagedArena(jnp.zeros(shape, self.compute_dtype),
                          jnp.zeros(shape, self.compute_dtype), self.start)

    def arena_bytes(self, pages: int, page_size: int = PAGE) -> int:
        """What new_arena(pages, page_size) would allocate."""
        c = self.config
        per_position = 2 * c.num_kv_heads * c.head_dim * self.compute_dtype.itemsize
        return self.num_layers * pages * page_size * per_position

    def forward_paged(
        self, hidden: Any, starts: Any, tables: Any, arena: PagedArena, kv_length: int
    ) -> tuple[jax.Array, PagedArena]:
        """Rows hidden [B, T, H], row b's positions from starts[b] (int32 [B]) in its pages
        tables[b] (int32 [B, M]) of an arena over a span that holds this runner's blocks.

        Attention through XLA reads the first ``kv_length`` positions of each row (the
        native decode kernel reads exactly the row's positions). Returns (hidden_out
        [B, T, H], the updated arena); the arena passed in is donated.
        """
        first = self.start - arena.start
        if not 0 <= first <= arena.num_layers - self.num_layers:
            raise ShapeMismatch(
                f"blocks {self.start}:{self.end} are not in the arena's {arena.num_layers} "
                f"layers from {arena.start}")
        shape = getattr(hidden, "shape", None)
        if shape is None or len(shape) != 3 or shape[2] != self.config.hidden_size:
            raise ShapeMismatch(f"rows must be [batch, length, hidden], got shape {shape}")
        width = np.shape(tables)[1] * arena.page_size
        if not 0 < kv_length <= width:
            raise CacheOverflow(f"kv_length {kv_length} outside the page tables' {width}")
        out, k, v = self._paged_step(
            tuple(p.leaves for p in self._programs),
            hidden,
            np.asarray(starts, np.int32),
            np.asarray(tables, np.int32),
            arena.k,
            arena.v,
            first=first,
            kv_length=int(kv_length),
            compute_dtype=self.compute_dtype.name,
        )
        return out, PagedArena(k, v, arena.start)

    def compile_paged(self, batch: int, length: int, width: int, pages: int, kv_length: int,
                      page_size: int = PAGE, arena_start: int | None = None) -> None:
        """Compile the ``forward_paged`` program of rows [batch, length, H], page tables
        [batch, width] over an arena of ``pages`` pages, without allocating anything (the
        program lands in the persistent compilation cache, where the first call finds it)."""
        c = self.config
        arena_start = self.start if arena_start is None else arena_start
        shape = (self.num_layers, pages, page_size, c.num_kv_heads, c.head_dim)
        arena = jax.ShapeDtypeStruct(shape, self.compute_dtype)
        self._paged_step.lower(
            tuple(p.leaves for p in self._programs),
            jax.ShapeDtypeStruct((batch, length, c.hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, width), jnp.int32),
            arena,
            arena,
            first=self.start - arena_start,
            kv_length=int(kv_length),
            compute_dtype=self.compute_dtype.name,
        ).compile()

    def forward(
        self, hidden: Any, start_position: int, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Run the new positions hidden [B, T, H] (numpy or JAX) starting at start_position.

        Returns (hidden_out [B, T, H] in the compute dtype, the updated cache).
        The cache passed in is donated: use only the returned one afterwards.
        """
        batch, length, width = _check_input(self.config, hidden, cache)
        end = start_position + length
        if start_position < 0 or end > cache.max_length:
            raise CacheOverflow(
                f"positions [{start_position}, {end}) do not fit a cache of {cache.max_length}"
            )
        padded = bucket_length(length)
        if start_position + padded > cache.max_length:
            padded = length
        if padded != length:
            buffer = np.zeros((batch, padded, width), dtype=np.asarray(hidden).dtype)
            buffer[:, :length] = np.asarray(hidden)
            hidden = buffer
        kv_length = min(cache.max_length, bucket_length(start_position + padded))
        out, k, v = self._step(
            tuple(p.leaves for p in self._programs),
            hidden,
            np.int32(start_position),
            cache.k,
            cache.v,
            kv_length=kv_length,
            compute_dtype=self.compute_dtype.name,
        )
        if padded != length:
            out = out[:, :length]
        return out, KVCache(k, v)


@dataclasses.dataclass(frozen=True)
class _Program:
    """One split module: its graph and tree structure (static) and its state's leaves (device
    arrays); ``scanned`` > 0: a block whose leaves are stacked over that many layers, the
    first being span layer ``first``."""

    graphdef: Any
    treedef: Any
    leaves: tuple[Any, ...]
    scanned: int = 0
    first: int = 0

    @classmethod
    def of(
        cls, module: nnx.Module, scanned: int = 0, first: int = 0, device: bool = True
    ) -> _Program:
        graphdef, state = nnx.split(module)
        leaves, treedef = jax.tree.flatten(state)
        if device:
            leaves = jax.device_put(leaves)
        return cls(graphdef, treedef, tuple(leaves), scanned, first)

    @property
    def key(self) -> tuple[Any, Any, int, int]:
        """What the compiled step depends on (never the weights' values)."""
        return self.graphdef, self.treedef, self.scanned, self.first

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, list(self.leaves)))

    def slice(self, begin: int, end: int, offset: int) -> _Program:
        """Stacked layers [begin, end) of the span, renumbered from ``offset``."""
        a, b = begin - self.first, end - self.first
        leaves = tuple(leaf[a:b] for leaf in self.leaves)
        return _Program(self.graphdef, self.treedef, leaves, end - begin, begin - offset)


def _runs(config: ModelConfig, start: int, end: int) -> list[tuple[int, int]]:
    """[i, j) ranges (span-relative) of consecutive layers whose blocks are of one kind."""
    kinds = [attention_spec(config, index) for index in range(start, end)]
    runs, first = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[first]:
            runs.append((first, i))
            first = i
    return runs


def _check_input(config: ModelConfig, hidden: Any, cache: KVCache) -> tuple[int, int, int]:
    shape = getattr(hidden, "shape", None)
    if shape is None or len(shape) != 3:
        raise ShapeMismatch(f"hidden states must be [batch, length, hidden], got shape {shape}")
    batch, length, width = (int(n) for n in shape)
    if width != config.hidden_size:
        raise ShapeMismatch(f"hidden size {width} != model hidden size {config.hidden_size}")
    if length < 1:
        raise ShapeMismatch("hidden states hold no positions")
    if batch != cache.batch:
        raise ShapeMismatch(f"batch {batch} != cache batch {cache.batch}")
    return batch, length, width


@functools.lru_cache(maxsize=256)
def _step_function(keys: tuple[tuple[Any, Any, int, int], ...]):
    """The jitted step for programs of these structures (shared by equal runners)."""

    def step(leaves, hidden, start, k_cache, v_cache, *, kv_length: int, compute_dtype: str):
        x = hidden.astype(compute_dtype)  # [B, T, H]
        positions = positions_from(start, x.shape[1])  # [T]
        cache = CacheView(k_cache, v_cache, layer=0, start=start, length=kv_length)
        for (graphdef, treedef, scanned, first), program_leaves in zip(keys, leaves):
            state = jax.tree.unflatten(treedef, list(program_leaves))
            if not scanned:
                x, cache = nnx.merge(graphdef, state)(x, positions, cache)
                continue

            def body(carry, xs, graphdef=graphdef):
                x, k, v = carry
                layer_state, layer = xs
                block = nnx.merge(graphdef, layer_state)
                view = CacheView(k, v, layer=layer, start=start, length=kv_length)
                x, view = block(x, positions, view)
                return (x, view.k, view.v), None

            layers = jnp.arange(first, first + scanned, dtype=jnp.int32)  # [L_run]
            (x, k, v), _ = lax.scan(body, (x, cache.k, cache.v), (state, layers))
            cache = dataclasses.replace(cache, k=k, v=v)
        return x, cache.k, cache.v

    return jax.jit(
        step, static_argnames=("kv_length", "compute_dtype"), donate_argnames=("k_cache", "v_cache")
    )
