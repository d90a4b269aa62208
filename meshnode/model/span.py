"""The span runner: blocks [start, end) over a fixed-size, donated KV cache.

A span's parameters arrive as one dict per layer. On accelerators they are
stacked on a leading axis and run with ``lax.scan``: one compiled step serves
the whole span and its compile time does not grow with the span. On CPU,
scan's per-layer weight slices are copies (decode ran 2x slower), so the layers
are unrolled over each layer's own device arrays instead (and layers may differ
in form: some weights quantized, some not). The runner keeps only the device
copy of the weights, and ``sub_runner`` serves any part of the span from that
same copy.
Shapes stay static: the cache is allocated once at its max
length rounded up to a bucket; prefill lengths are padded to a bucket (the pad
positions are written past the real ones and never attended to before being
overwritten); attention reads only a bucketed prefix of the cache.

    runner = SpanRunner(config, source.load_span_params(0, 30, np.float32))
    cache = runner.new_cache(max_length=512)
    hidden, cache = runner.forward(embedded, start_position=0, cache=cache)   # prefill
    hidden, cache = runner.forward(next_embedded, start_position=n, cache=cache)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from meshnode.errors import CacheOverflow, ShapeMismatch
from meshnode.model import quant
from meshnode.model.config import ModelConfig
from meshnode.model.layers import attention_mask, decoder_block
from meshnode.model.quant import is_quantized
from meshnode.model.rope import inverse_frequencies, rope_tables

#: prefill lengths are padded up to the next of these (then to multiples of the last)
LENGTH_BUCKETS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: caches are allocated at a multiple of this many positions (or a smaller power of two)
CACHE_BUCKET = 256


def bucket_length(length: int, buckets: tuple[int, ...] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= length; past the last, the next multiple of the last."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    last = buckets[-1]
    return -(-length // last) * last


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
            layers: Any = jax.device_put(params.stacked())
        else:
            layers = [jax.device_put(layer) for layer in params.layers]
        self._setup(config, params.start, params.end, compute_dtype, scan, layers)

    def _setup(
        self, config: ModelConfig, start: int, end: int, compute_dtype: Any, scan: bool, layers: Any
    ) -> None:
        self.config = config
        self.start, self.end = start, end
        self.num_layers = end - start
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.scan = scan
        self._windows = tuple(config.layer_windows[start:end])
        self._layers = layers  # device arrays: stacked (scan) or one dict per layer

    def sub_runner(self, start: int, end: int) -> SpanRunner:
        """Blocks [start, end) of this span, sharing this runner's device weights."""
        if not self.start <= start < end <= self.end:
            raise ShapeMismatch(
                f"blocks {start}:{end} are not inside this runner's {self.start}:{self.end}"
            )
        i, j = start - self.start, end - self.start
        if self.scan:
            layers: Any = {name: a[i:j] for name, a in self._layers.items()}
        else:
            layers = self._layers[i:j]
        runner = object.__new__(SpanRunner)
        runner._setup(self.config, start, end, self.compute_dtype, self.scan, layers)
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
        static = {
            "config": self.config,
            "kv_length": kv_length,
            "compute_dtype": self.compute_dtype.name,
        }
        start = np.int32(start_position)
        if self.scan:
            windows = np.asarray(self._windows, dtype=np.int32)  # [L]
            out, k, v = _scan_step(self._layers, windows, hidden, start, cache.k, cache.v, **static)
        else:
            out, k, v = _unrolled_step(
                self._layers, hidden, start, cache.k, cache.v, windows=self._windows, **static
            )
        if padded != length:
            out = out[:, :length]
        return out, KVCache(k, v)


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


def _prologue(hidden, start, config: ModelConfig, compute_dtype: str):
    x = hidden.astype(compute_dtype)  # [B, T, H]
    positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)  # [T]
    rope = rope_tables(jnp.asarray(inverse_frequencies(config)), positions)  # [T, D] x2
    return x, positions, rope


def _cast(layer: dict, compute_dtype: str) -> dict:
    """Float weights in the compute dtype; quantized ones stay as they are."""
    return {name: p if is_quantized(p) else p.astype(compute_dtype) for name, p in layer.items()}


@functools.partial(
    jax.jit,
    static_argnames=("config", "windows", "kv_length", "compute_dtype"),
    donate_argnames=("k_cache", "v_cache"),
)
def _unrolled_step(
    layers: list[dict],
    hidden: jax.Array,
    start: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    config: ModelConfig,
    windows: tuple[int, ...],
    kv_length: int,
    compute_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Python-level layer after another over per-layer weight arrays."""
    x, positions, rope = _prologue(hidden, start, config, compute_dtype)
    cache = (k_cache, v_cache)
    for index, (layer, window) in enumerate(zip(layers, windows)):
        mask = attention_mask(positions, kv_length, window)  # [T, A]
        x, cache = decoder_block(
            config, _cast(layer, compute_dtype), x, rope, mask, cache, (index, start), window
        )
    return x, *cache


@functools.partial(
    jax.jit,
    static_argnames=("config", "kv_length", "compute_dtype"),
    donate_argnames=("k_cache", "v_cache"),
)
def _scan_step(
    layers: dict,
    windows: jax.Array,
    hidden: jax.Array,
    start: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    config: ModelConfig,
    kv_length: int,
    compute_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """lax.scan over stacked weights: one compiled layer whatever the span length."""
    x, positions, rope = _prologue(hidden, start, config, compute_dtype)
    indices = jnp.arange(windows.shape[0], dtype=jnp.int32)  # [L]

    def body(carry, xs):
        x, k_cache, v_cache = carry
        layer, index, window = xs
        mask = attention_mask(positions, kv_length, window)  # [T, A]
        x, (k_cache, v_cache) = decoder_block(
            config,
            _cast(layer, compute_dtype),
            x,
            rope,
            mask,
            (k_cache, v_cache),
            (index, start),
            window,
        )
        return (x, k_cache, v_cache), None

    (x, k_cache, v_cache), _ = lax.scan(body, (x, k_cache, v_cache), (layers, indices, windows))
    return x, k_cache, v_cache
