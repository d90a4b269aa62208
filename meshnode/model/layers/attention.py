"""Self-attention over a fixed-size KV cache, as an NNX module.

``Attention(x [B, T, H], positions [T], cache) -> (out [B, T, H], cache)``:
fused q/k/v projection (optional biases), optional per-head RMSNorm of q and k
(qk-norm: Qwen3, Gemma 3) before the rotary embedding, grouped-query heads, a
sliding window or none, an optional tanh softcap of the scores, and a scale
that defaults to head_dim^-0.5. ``CacheView`` is the span's cache as the
layer sees it: keys and values of every layer of the span [L, B, S, K, D],
the layer this module writes, where the new positions start, and how many
cache positions attention reads (a bucket, so early decode steps of a long
session do not pay for the whole cache). Float32 queries go to the native
kernel where it runs, which reads the cache in place: one position (a decode
step) to the decode kernel, a prefill's positions to the paged kernel over the
cache seen as pages (``session_prefill_attention``), each query over its causal
prefix only instead of the padded square.
Scores and softmax are float32 whatever the compute dtype.

``PagedView`` is the other cache layout (meshnode/model/paged.py): an arena of
pages shared by many sessions, each row of the batch at its own position with
its own page table. Every row is computed on its own: its writes go to its
pages, its rotary tables and masks come from its positions, and every float32
query position (a batched decode step's rows, a prefill chunk's positions) goes
to the native paged kernel, which reads only that position's causal prefix of
the arena in place; elsewhere an XLA path gathers the row's pages. A decode
row through XLA reads its whole page table (not a bucket of the batch's
longest row), so what it computes never depends on its batch-mates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from meshnode import native
from meshnode.model.layers.linear import add_bias, project
from meshnode.model.rope import apply_rope, rope_tables

#: additive mask value; finite so fully masked (padding) rows stay NaN-free
MASK_VALUE = -1e30
#: the page of a paged arena nobody owns (padding goes there); see meshnode/model/paged.py
SCRATCH_PAGE = 0


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer computes; hashable (it is part of the compiled program)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: rotary inverse frequencies, float32 values [head_dim // 2]
    inv_freq: tuple[float, ...]
    #: attend to at most this many most recent positions (itself included); 0 = all
    window: int = 0
    #: score multiplier; None = head_dim ** -0.5
    scale: float | None = None
    #: scores -> tanh(scores / softcap) * softcap; None = no cap
    softcap: float | None = None
    #: longrope: frequencies used when a call reaches past ``long_after`` positions
    inv_freq_long: tuple[float, ...] = ()
    long_after: int = 0
    #: cos and sin multiplied by this (longrope's attention factor)
    rope_scale: float = 1.0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def score_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale is None else self.scale


@dataclasses.dataclass(frozen=True)
class CacheView:
    """k, v [L, B, S, K, D] of a span; ``layer`` is the one being run, new positions go at
    ``start``, attention reads the first ``length`` positions."""

    k: jax.Array
    v: jax.Array
    layer: Any
    start: Any
    length: int

    def at_layer(self, layer: Any) -> CacheView:
        return dataclasses.replace(self, layer=layer)


@dataclasses.dataclass(frozen=True)
class PagedView:
    """An arena k, v [L, pages, P, K, D] seen by a batch: row b's positions start at
    ``starts[b]`` (int32 [B]) and live in its pages ``tables[b]`` (int32 [B, M]); ``layer``
    is the arena layer being run (``first`` + the block's index in its program); attention
    of positions written through XLA reads the first ``length`` positions of each row."""

    k: jax.Array
    v: jax.Array
    layer: Any
    first: int
    tables: jax.Array
    starts: jax.Array
    length: int

    def at_layer(self, layer: Any) -> PagedView:
        return dataclasses.replace(self, layer=self.first + layer)

    @property
    def page_size(self) -> int:
        return int(self.k.shape[2])

    def slots(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(page, offset) int32 [B, T] of positions [B, T]; past the table: the scratch page."""
        size, width = self.page_size, self.tables.shape[1]
        index = jnp.minimum(positions // size, width - 1)  # [B, T]
        page = jnp.take_along_axis(self.tables, index, axis=1)  # [B, T]
        page = jnp.where(positions < width * size, page, SCRATCH_PAGE)  # [B, T]
        return page, positions % size


def attention_mask(q_positions: jnp.ndarray, kv_length: int, window: Any) -> jnp.ndarray:
    """bool [T, A]: causal, and within ``window`` positions when window > 0."""
    kv_positions = jnp.arange(kv_length)[None, :]  # [1, A]
    q = q_positions[:, None]  # [T, 1]
    causal = kv_positions <= q  # [T, A]
    in_window = jnp.where(window > 0, kv_positions > q - window, True)  # [T, A]
    return causal & in_window


class Attention(nnx.Module):
    """wqkv [H, Q + 2KV] (or QuantizedMatrix [Q + 2KV, H]), wo [Q, H]; optional bqkv, bo,
    and q_norm / k_norm modules over [.., head_dim]."""

    def __init__(
        self,
        spec: AttentionSpec,
        wqkv: Any,
        wo: Any,
        *,
        bqkv: Any = None,
        bo: Any = None,
        q_norm: nnx.Module | None = None,
        k_norm: nnx.Module | None = None,
    ) -> None:
        self.spec = spec
        self.wqkv = nnx.Param(wqkv)
        self.wo = nnx.Param(wo)
        self.bqkv = None if bqkv is None else nnx.Param(bqkv)
        self.bo = None if bo is None else nnx.Param(bo)
        self.q_norm = q_norm
        self.k_norm = k_norm

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: CacheView
    ) -> tuple[jax.Array, CacheView]:
        spec = self.spec
        batch, length, _ = x.shape
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim

        qkv = add_bias(project(x, self.wqkv), self.bqkv)  # [B, T, Q + 2KV]
        q, k, v = jnp.split(qkv, [spec.q_size, spec.q_size + spec.kv_size], axis=-1)
        q = q.reshape(batch, length, heads, dim)  # [B, T, N, D]
        k = k.reshape(batch, length, kv_heads, dim)  # [B, T, K, D]
        v = v.reshape(batch, length, kv_heads, dim)  # [B, T, K, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(cache, PagedView):
            return self._paged(q, k, v, positions, cache)
        inv_freq = jnp.asarray(spec.inv_freq, jnp.float32)  # [D/2]
        if spec.inv_freq_long:
            long = jnp.max(positions) + 1 > spec.long_after
            inv_freq = jnp.where(long, jnp.asarray(spec.inv_freq_long, jnp.float32), inv_freq)
        cos, sin = rope_tables(inv_freq, positions, spec.rope_scale)  # [T, D] x2
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        at = (cache.layer, 0, cache.start, 0, 0)
        k_cache = lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at)
        v_cache = lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at)
        cache = dataclasses.replace(cache, k=k_cache, v=v_cache)
        if self._native(q, k_cache):
            q = self._kernel_scaled(q)
            if length == 1:
                out = decode_attention(q[:, 0], k_cache, v_cache, cache.layer, cache.start,
                                       spec.window)[:, None]  # [B, 1, N, D]
            else:
                out = session_prefill_attention(q, k_cache, v_cache, cache.layer, positions,
                                                spec.window)  # [B, T, N, D]
        else:
            out = self._attend(q, cache, positions)  # [B, T, N, D]
        out = project(out.reshape(batch, length, heads * dim), self.wo)  # [B, T, H]
        return add_bias(out, self.bo), cache

    def _paged(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
               cache: PagedView) -> tuple[jax.Array, PagedView]:
        """q [B, T, N, D], k, v [B, T, K, D] (before rope) at positions [B, T], row by row."""
        spec = self.spec
        batch, length, heads, dim = q.shape
        q, k = self._rope_rows(q, positions), self._rope_rows(k, positions)
        page, offset = cache.slots(positions)  # [B, T] x2
        k_arena = cache.k.at[cache.layer, page, offset].set(k.astype(cache.k.dtype))
        v_arena = cache.v.at[cache.layer, page, offset].set(v.astype(cache.v.dtype))
        cache = dataclasses.replace(cache, k=k_arena, v=v_arena)
        if self._native(q, k_arena):
            # one kernel row per query position (a chunk's table repeated): each reads its
            # causal prefix in place
            last = cache.tables.shape[1] * cache.page_size - 1  # padding past the table
            out = paged_decode_attention(
                self._kernel_scaled(q).reshape(batch * length, heads, dim),
                k_arena, v_arena, cache.layer,
                jnp.minimum(positions, last).reshape(-1),  # [B*T]
                jnp.repeat(cache.tables, length, axis=0),  # [B*T, M]
                spec.window).reshape(batch, length, heads, dim)  # [B, T, N, D]
        else:
            out = self._attend_pages(q, cache, positions)  # [B, T, N, D]
        out = project(out.reshape(batch, length, heads * dim), self.wo)  # [B, T, H]
        return add_bias(out, self.bo), cache

    def _native(self, q: jax.Array, k_cache: jax.Array) -> bool:
        return k_cache.dtype == q.dtype and native_attention(q.dtype, self.spec.softcap)

    def _kernel_scaled(self, q: jax.Array) -> jax.Array:
        """q [.., D] for the native kernels, which scale scores by D^-0.5: any other scale
        folded into q."""
        spec = self.spec
        return q * (spec.score_scale * spec.head_dim**0.5) if spec.scale is not None else q

    def _rope_rows(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, h, D] rotated by each row's own positions [B, T] (and, for longrope,
        each row's own choice of frequencies)."""
        spec = self.spec
        batch, length = positions.shape
        flat = positions.reshape(-1)  # [B*T]
        rows = x.reshape(1, batch * length, *x.shape[2:])  # [1, B*T, h, D]
        cos, sin = rope_tables(jnp.asarray(spec.inv_freq, jnp.float32), flat, spec.rope_scale)
        if spec.inv_freq_long:
            long = jnp.max(positions, axis=1, keepdims=True) + 1 > spec.long_after  # [B, 1]
            long = jnp.broadcast_to(long, positions.shape).reshape(-1, 1)  # [B*T, 1]
            inv_long = jnp.asarray(spec.inv_freq_long, jnp.float32)  # [D/2]
            cos_l, sin_l = rope_tables(inv_long, flat, spec.rope_scale)  # [B*T, D] x2
            cos, sin = jnp.where(long, cos_l, cos), jnp.where(long, sin_l, sin)
        return apply_rope(rows, cos, sin).reshape(x.shape)

    def _attend_pages(self, q: jax.Array, cache: PagedView, positions: jax.Array) -> jax.Array:
        """q [B, T, N, D] over the first cache.length positions of each row's pages."""
        spec = self.spec
        batch, _, _, dim = q.shape
        kv_heads = spec.num_kv_heads
        read = -(-cache.length // cache.page_size)
        tables = cache.tables[:, :read]  # [B, R]
        keys = cache.k[cache.layer][tables].reshape(batch, -1, kv_heads, dim)  # [B, A, K, D]
        values = cache.v[cache.layer][tables].reshape(batch, -1, kv_heads, dim)  # [B, A, K, D]
        mask = jax.vmap(attention_mask, in_axes=(0, None, None))(
            positions, keys.shape[1], spec.window)  # [B, T, A]
        return self._grouped(q, keys, values, mask)

    def _attend(self, q: jax.Array, cache: CacheView, positions: jax.Array) -> jax.Array:
        """q [B, T, N, D] over the first cache.length positions -> [B, T, N, D]."""
        spec = self.spec
        batch, _, _, dim = q.shape
        kv_heads = spec.num_kv_heads
        visible = (1, batch, cache.length, kv_heads, dim)
        keys = lax.dynamic_slice(cache.k, (cache.layer, 0, 0, 0, 0), visible)[0]  # [B, A, K, D]
        values = lax.dynamic_slice(cache.v, (cache.layer, 0, 0, 0, 0), visible)[0]  # [B, A, K, D]
        mask = attention_mask(positions, cache.length, spec.window)  # [T, A]
        return self._grouped(q, keys, values, mask[None])

    def _grouped(self, q: jax.Array, keys: jax.Array, values: jax.Array,
                 mask: jax.Array) -> jax.Array:
        """q [B, T, N, D] over keys, values [B, A, K, D] where ``mask`` [B or 1, T, A] is
        true (grouped-query heads, float32 scores) -> [B, T, N, D]."""
        spec = self.spec
        batch, length, heads, dim = q.shape
        kv_heads = spec.num_kv_heads
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)  # [B, T, K, G, D]
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32
        )  # [B, K, G, T, A]
        scores = scores * spec.score_scale
        if spec.softcap is not None:
            scores = jnp.tanh(scores / spec.softcap) * spec.softcap
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, A]
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype))  # [B, T, K, G, D]
        return out.reshape(batch, length, heads, dim)


def native_attention(dtype: Any, softcap: float | None) -> bool:
    """Whether attention in ``dtype`` (with score ``softcap``) runs on the native kernels
    here: float32, no softcap, kernels built. Each query then reads exactly its own
    positions in place, whatever bucketed length an XLA path would read."""
    return softcap is None and jnp.dtype(dtype) == jnp.float32 and native.load()


def paged_decode_attention(
    q: jax.Array,
    k_arena: jax.Array,
    v_arena: jax.Array,
    layer_index: Any,
    positions: jax.Array,
    tables: jax.Array,
    window: Any,
) -> jax.Array:
    """q [B, N, D], row b at its own position ``positions[b]`` (int32 [B]) over its pages
    ``tables[b]`` (int32 [B, M]) of layer ``layer_index`` of the float32 arenas
    [L, pages, P, K, D]: the native kernel (meshnode/native/attention.cc). -> [B, N, D]."""
    def scalar(value):
        return jnp.asarray(value, dtype=jnp.int32).reshape(())
    call = jax.ffi.ffi_call(native.PAGED_ATTENTION_TARGET,
                            jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_arena, v_arena, scalar(layer_index), positions.astype(jnp.int32),
                tables.astype(jnp.int32), scalar(window))


def session_prefill_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer_index: Any,
    positions: jax.Array,
    window: Any,
) -> jax.Array:
    """q [B, T, N, D] at positions [T] of the float32 session caches [L, B, S, K, D], each
    query over its causal prefix: the caches seen as an arena of pages (a free reshape,
    row b's pages in order) for the native paged kernel, one kernel row per query, so a
    prefill computes per position what a decode step there would. Returns [B, T, N, D]."""
    layers, batch, length, kv_heads, dim = k_cache.shape
    page = 64 if length % 64 == 0 else 16  # cache lengths are multiples of 16
    per_row = length // page
    shape = (layers, batch * per_row, page, kv_heads, dim)
    steps = positions.shape[0]
    tables = jnp.arange(batch * per_row, dtype=jnp.int32).reshape(batch, 1, per_row)
    tables = jnp.broadcast_to(tables, (batch, steps, per_row)).reshape(-1, per_row)  # [B*T, M]
    rows = jnp.broadcast_to(positions[None], (batch, steps)).reshape(-1)  # [B*T]
    out = paged_decode_attention(q.reshape(batch * steps, *q.shape[2:]), k_cache.reshape(shape),
                                 v_cache.reshape(shape), layer_index, rows, tables, window)
    return out.reshape(q.shape)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer_index: Any,
    position: Any,
    window: Any,
) -> jax.Array:
    """q [B, N, D] of one position over layer ``layer_index`` of the float32 caches
    [L, B, S, K, D], positions [position - window + 1 (window > 0), position]: the
    native kernel (meshnode/native/attention.cc). Returns [B, N, D]."""
    def scalar(value):
        return jnp.asarray(value, dtype=jnp.int32).reshape(())
    call = jax.ffi.ffi_call(native.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, scalar(layer_index), scalar(position), scalar(window))
