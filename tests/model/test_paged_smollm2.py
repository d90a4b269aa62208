"""Batch invariance with the real quantized model: a decode row of SmolLM2's 30 blocks is
bitwise the same alone or among 63 others."""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.model import quant
from meshnode.model.paged import SCRATCH_PAGE, PageAllocator, PagedCache
from meshnode.model.source import open_model
from meshnode.model.span import SpanRunner

pytestmark = pytest.mark.slow
WIDTH = 4


@pytest.fixture(scope="module")
def smollm2():
    source = open_model("smollm2")
    runner = SpanRunner(source.config, source.load_span_params(0, 30, np.float32))
    return runner, source.config.hidden_size


@pytest.mark.parametrize("batch", [2, 64])
def test_a_quantized_decode_row_is_bitwise_the_same_alone_or_batched(smollm2, batch,
                                                                      monkeypatch):
    """When SmolLM2's decode rows of sessions at different positions run alone or
    ``batch`` together, with every matmul of the batch going to the fused row-by-row
    quantized kernel, then each row's output is bitwise the same."""
    runner, hidden = smollm2
    monkeypatch.setattr(quant, "FUSED_MAX_ROWS", max(quant.FUSED_MAX_ROWS, 64))
    rng = np.random.default_rng(batch)
    allocator = PageAllocator(batch * WIDTH + 1)
    arena = runner.new_arena(allocator.pages)
    caches = [PagedCache(allocator, allocator.allocate(WIDTH)) for _ in range(batch)]
    lengths = [3 + (7 * i) % 60 for i in range(batch)]
    for cache, length in zip(caches, lengths):
        prompt = np.zeros((1, 64, hidden), np.float32)  # [1, 64, H]
        prompt[:, :length] = rng.standard_normal((1, length, hidden)) * 0.1
        _, arena = runner.forward_paged(prompt, [0], cache.table(WIDTH)[None], arena, 64)
    tokens = (rng.standard_normal((batch, 1, hidden)) * 0.1).astype(np.float32)  # [B, 1, H]
    tables = np.stack([c.table(WIDTH) for c in caches])  # [B, M]
    starts = np.asarray(lengths, np.int32)
    together, arena = runner.forward_paged(tokens, starts, tables, arena, WIDTH * 64)
    for row in (0, batch - 1):
        alone, arena = runner.forward_paged(tokens[row : row + 1], starts[row : row + 1],
                                            tables[row : row + 1], arena, WIDTH * 64)
        assert np.array_equal(np.asarray(together)[row], np.asarray(alone)[0])
    assert SCRATCH_PAGE not in tables[:, 0]
