"""The blocks as ordinary Flax NNX modules, and the span runner's two layouts.

A span's ``DecoderStack`` (or one ``DecoderBlock`` of it) can be called inside
someone else's NNX module; the runner's scan layout (runs of layers of one
kind stacked and scanned: Gemma 3's local and global layers are two kinds)
computes what its unrolled layout does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshnode.model.families.registry import build_stack
from meshnode.model.layers.attention import CacheView
from meshnode.model.layers.block import DecoderBlock, DecoderStack, positions_from
from meshnode.model.source import open_model
from meshnode.model.span import SpanRunner, _runs
from tests.model.model_helpers import build_reference, relative_error, write_checkpoint


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    reference = build_reference("gemma3")
    return open_model(write_checkpoint(reference, tmp_path_factory.mktemp("gemma3")))


class Wrapper(nnx.Module):
    """Someone else's module: a projection, then one of our blocks."""

    def __init__(self, block: DecoderBlock, hidden: int) -> None:
        self.scale = nnx.Param(jnp.full((hidden,), 0.5, jnp.float32))
        self.block = block

    def __call__(self, x, positions, cache):
        return self.block(x * self.scale[...], positions, cache)


def test_a_block_runs_inside_another_nnx_module(gemma3):
    """When a loaded Gemma 3 block is wrapped in a user's NNX module and run through
    nnx.split / jax.jit / nnx.merge, then it computes what the span runner computes."""
    c = gemma3.config
    params = gemma3.load_span_params(1, 2)
    stack = build_stack(c, 1, params.layers)
    assert isinstance(stack, DecoderStack) and isinstance(stack.blocks[0], DecoderBlock)
    wrapper = Wrapper(stack.blocks[0], c.hidden_size)
    graphdef, state = nnx.split(wrapper)
    x = np.random.default_rng(0).standard_normal((1, 5, c.hidden_size)).astype(np.float32)

    @jax.jit
    def run(state, x, k, v):
        module = nnx.merge(graphdef, state)
        view = CacheView(k, v, layer=0, start=jnp.int32(0), length=16)
        out, view = module(x, positions_from(jnp.int32(0), 5), view)
        return out

    runner = SpanRunner(c, params)
    cache = runner.new_cache(16)
    ours = run(state, x, cache.k, cache.v)
    expected, _ = runner.forward(x * 0.5, 0, runner.new_cache(16))
    assert relative_error(np.asarray(ours), np.asarray(expected)) <= 1e-6
    assert isinstance(runner.module, DecoderStack)


def test_scan_layout_equals_unrolled_layout_for_local_and_global_layers(gemma3):
    """When Gemma 3's local and global layers run as scanned runs, then prefill and a decode
    step equal the unrolled run, and a sub-runner across the runs equals its part."""
    c = gemma3.config
    assert _runs(c, 0, 3) == [(0, 1), (1, 2), (2, 3)]
    params = gemma3.load_span_params(0, 3)
    x = np.random.default_rng(1).standard_normal((1, 13, c.hidden_size)).astype(np.float32)
    outputs = []
    for scan in (False, True):
        runner = SpanRunner(c, params, scan=scan)
        cache = runner.new_cache(16)
        prefill, cache = runner.forward(x[:, :12], 0, cache)
        step, cache = runner.forward(x[:, 12:], 12, cache)
        part = runner.sub_runner(1, 3)
        tail, _ = part.forward(np.asarray(prefill), 0, part.new_cache(16))
        outputs.append([np.asarray(prefill), np.asarray(step), np.asarray(tail)])
    for ours, theirs in zip(*outputs):
        assert relative_error(ours, theirs) <= 1e-5
