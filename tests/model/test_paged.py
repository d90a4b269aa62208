"""The paged KV cache: its pages, and rows whose outputs do not depend on their batch-mates."""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.errors import CacheOverflow
from meshnode.model.buckets import CHUNK
from meshnode.model.generate import LocalBlocks
from meshnode.model.layers import attention
from meshnode.model.paged import SCRATCH_PAGE, PageAllocator, PagedCache
from meshnode.model.source import open_model
from meshnode.model.span import SpanRunner
from tests.mesh.mesh_helpers import write_tiny_checkpoint

WIDTH = 4  # pages per row's table: 256 positions


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return open_model(str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")))


@pytest.fixture(scope="module")
def runner(source):
    return SpanRunner(source.config, source.load_span_params(0, 6, np.float32))


def filled(runner, sessions: int, seed: int = 0):
    """An arena with ``sessions`` sessions, session i holding a prompt of 5 + 9 i % 200
    positions; returns (arena, caches, prompt lengths)."""
    rng = np.random.default_rng(seed)
    allocator = PageAllocator(sessions * WIDTH + 1)
    arena = runner.new_arena(allocator.pages)
    caches, lengths = [], []
    for i in range(sessions):
        cache = PagedCache(allocator, allocator.allocate(WIDTH))
        length = 5 + (9 * i) % 200
        prompt = np.zeros((1, 64 * (1 + length // 64), 64), np.float32)  # [1, T, H]
        prompt[:, :length] = rng.standard_normal((1, length, 64))
        _, arena = runner.forward_paged(prompt, [0], cache.table(WIDTH)[None], arena, 256)
        caches.append(cache)
        lengths.append(length)
    return arena, caches, lengths


def decode(runner, arena, caches, lengths, rows: list[int], seed: int = 1):
    """One decode step of sessions ``rows`` batched (padded to 64 rows with scratch rows)."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((len(caches), 1, 64)).astype(np.float32)  # [S, 1, H]
    hidden = np.zeros((max(len(rows), 1), 1, 64), np.float32)  # [B, 1, H]
    starts = np.zeros(len(rows), np.int32)
    tables = np.full((len(rows), WIDTH), SCRATCH_PAGE, np.int32)  # [B, M]
    for i, row in enumerate(rows):
        hidden[i] = tokens[row]
        starts[i] = lengths[row]
        tables[i] = caches[row].table(WIDTH)
    out, arena = runner.forward_paged(hidden, starts, tables, arena, WIDTH * 64)
    return np.asarray(out), arena


def test_pages_are_given_out_once_and_the_scratch_page_never():
    """When pages are allocated, released and reset, then no page is held twice, the scratch
    page is never given, a release after a reset gives nothing back, and asking for more
    than is free is CacheOverflow."""
    allocator = PageAllocator(5)
    first = PagedCache(allocator, allocator.allocate(2))
    second = PagedCache(allocator, allocator.allocate(2))
    held = {*first.pages, *second.pages}
    assert SCRATCH_PAGE not in held and len(held) == 4
    with pytest.raises(CacheOverflow):
        allocator.allocate(1)
    first.release()
    first.release()
    assert allocator.free == 2
    allocator.reset()
    second.release()  # taken before the reset: nothing given back twice
    assert allocator.free == 4
    assert list(first.table(4)) == [*first.pages, SCRATCH_PAGE, SCRATCH_PAGE]


@pytest.mark.parametrize("batch", [2, 7, 16, 33, 64])
def test_a_decode_row_is_bitwise_the_same_alone_or_batched(runner, batch):
    """When a session's decode step runs alone, or as one of ``batch`` rows of sessions at
    other positions (native paged attention where it runs), then its output is bitwise
    the same, and so is every other row's."""
    arena, caches, lengths = filled(runner, batch, seed=batch)
    alone, arena = decode(runner, arena, caches, lengths, [batch - 1])
    together, arena = decode(runner, arena, caches, lengths, list(range(batch))[::-1])
    assert np.array_equal(together[0], alone[0])
    for row in (0, batch // 2):  # and the others too, each against itself alone
        by_itself, arena = decode(runner, arena, caches, lengths, [row])
        assert np.array_equal(together[batch - 1 - row], by_itself[0])


def test_the_pure_jax_paged_path_is_batch_invariant_and_agrees(runner, monkeypatch):
    """When the native kernel is off (a GPU, or no compiler), then a decode row through the
    XLA path is bitwise the same alone or beside others, and close to the native one."""
    arena, caches, lengths = filled(runner, 8, seed=3)
    native_out, arena = decode(runner, arena, caches, lengths, [2, 5, 7])
    monkeypatch.setattr(attention, "native_attention", lambda dtype, softcap: False)
    # other shapes than the native calls above, so these trace again (without the kernel)
    alone, arena = decode(runner, arena, caches, lengths, [2, 5, 7, 1, 0])
    together, arena = decode(runner, arena, caches, lengths, [2, 5, 7, 1, 0, 3, 4, 6])
    assert np.array_equal(alone[:5], together[:5])
    np.testing.assert_allclose(alone[:3], native_out, rtol=1e-5, atol=1e-5)


def test_paged_prefill_and_decode_agree_with_one_session_cache(runner):
    """When a prompt and a decode step run over the paged arena, then they match the same
    positions run over a session's own cache."""
    rng = np.random.default_rng(4)
    prompt = rng.standard_normal((1, 37, 64)).astype(np.float32)  # [1, T, H]
    token = rng.standard_normal((1, 1, 64)).astype(np.float32)  # [1, 1, H]
    cache = runner.new_cache(256)
    ref_prompt, cache = runner.forward(prompt, 0, cache)
    ref_token, cache = runner.forward(token, 37, cache)
    allocator = PageAllocator(5)
    arena = runner.new_arena(5)
    pages = PagedCache(allocator, allocator.allocate(4)).table(WIDTH)[None]  # [1, M]
    padded = np.pad(prompt, ((0, 0), (0, 27), (0, 0)))  # [1, 64, H]
    out_prompt, arena = runner.forward_paged(padded, [0], pages, arena, 64)
    out_token, arena = runner.forward_paged(token, [37], pages, arena, 256)
    np.testing.assert_allclose(np.asarray(out_prompt)[:, :37], ref_prompt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_token, ref_token, rtol=1e-5, atol=1e-5)


def test_local_blocks_run_a_long_prompt_in_causal_chunks(runner):
    """When local generation's blocks take a prompt longer than a chunk (300 positions:
    chunks of 256 and 44, each padded) and then decode steps, then every position matches
    the same positions run at once over a session's own cache (the padded square)."""
    rng = np.random.default_rng(5)
    prompt = rng.standard_normal((1, 300, 64)).astype(np.float32)  # [1, T, H]
    tokens = rng.standard_normal((2, 1, 1, 64)).astype(np.float32)  # two steps of [1, 1, H]
    cache = runner.new_cache(320)
    ref_prompt, cache = runner.forward(prompt, 0, cache)
    ref_steps = []
    for i, token in enumerate(tokens):
        out, cache = runner.forward(token, 300 + i, cache)
        ref_steps.append(np.asarray(out))
    blocks = LocalBlocks(runner, 302)
    assert CHUNK < 300
    np.testing.assert_allclose(np.asarray(blocks(prompt, 0)), ref_prompt, rtol=1e-4, atol=1e-4)
    for i, token in enumerate(tokens):
        np.testing.assert_allclose(np.asarray(blocks(token, 300 + i)), ref_steps[i],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(CacheOverflow):
        blocks(tokens[0], blocks.positions)


def test_padding_rows_write_only_the_scratch_page(runner):
    """When a batch is padded with scratch rows, then no session's pages change but those
    of the rows that stepped."""
    arena, caches, lengths = filled(runner, 3)
    before = np.asarray(arena.k).copy()
    hidden = np.ones((4, 1, 64), np.float32)  # one real row, three padding rows
    tables = np.full((4, WIDTH), SCRATCH_PAGE, np.int32)
    tables[0] = caches[1].table(WIDTH)
    starts = np.array([lengths[1], 0, 5, 200], np.int32)
    _, arena = runner.forward_paged(hidden, starts, tables, arena, WIDTH * 64)
    after = np.asarray(arena.k)
    changed = {int(p) for p in np.nonzero((after != before).any(axis=(0, 2, 3, 4)))[0]}
    assert changed <= {SCRATCH_PAGE, caches[1].pages[lengths[1] // 64]}
    assert caches[1].pages[lengths[1] // 64] in changed


def test_zero_padding_rows_stay_zero_through_the_span(runner):
    """When a decode batch is padded with rows of zeros on the scratch page (as a worker pads
    to a row bucket), then those rows come out of every block exactly zero, which is what
    lets the native matmuls leave them out (meshnode/native/rows.h), and the real rows are
    bitwise what they are without padding."""
    arena, caches, lengths = filled(runner, 3)
    alone, arena = decode(runner, arena, caches, lengths, [0, 2])
    padded = np.zeros((8, 1, 64), np.float32)
    padded[:2] = np.random.default_rng(1).standard_normal((3, 1, 64)).astype(np.float32)[[0, 2]]
    tables = np.full((8, WIDTH), SCRATCH_PAGE, np.int32)
    tables[0], tables[1] = caches[0].table(WIDTH), caches[2].table(WIDTH)
    starts = np.array([lengths[0], lengths[2], 0, 0, 0, 0, 0, 0], np.int32)
    out, _ = runner.forward_paged(padded, starts, tables, arena, WIDTH * 64)
    out = np.asarray(out)
    assert not out[2:].any()
    np.testing.assert_array_equal(out[:2], alone)


def test_a_scanned_span_runs_the_paged_step_as_the_unrolled_one(source, runner):
    """When the span's layers run under lax.scan (the accelerator layout), and a sub-span
    writes its own layers of the arena, then prefill and decode over the arena match the
    unrolled runner."""
    scanned = SpanRunner(source.config, source.load_span_params(0, 6, np.float32), scan=True)
    rng = np.random.default_rng(5)
    prompt = rng.standard_normal((1, 16, 64)).astype(np.float32)  # [1, T, H]
    token = rng.standard_normal((1, 1, 64)).astype(np.float32)  # [1, 1, H]
    outs = []
    for each in (runner, scanned):
        allocator = PageAllocator(5)
        arena = each.new_arena(5)
        table = PagedCache(allocator, allocator.allocate(4)).table(WIDTH)[None]  # [1, M]
        first, arena = each.sub_runner(0, 2).forward_paged(prompt, [0], table, arena, 16)
        rest, arena = each.sub_runner(2, 6).forward_paged(first, [0], table, arena, 16)
        step, arena = each.forward_paged(token, [16], table, arena, 256)
        outs.append((np.asarray(rest), np.asarray(step)))
    for ours, theirs in zip(*outs):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

