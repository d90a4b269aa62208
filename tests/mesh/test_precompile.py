"""The step programs a worker compiles ahead: every program of a session up to 256 positions."""

from __future__ import annotations

import pytest

from meshnode.model.span import bucket_length
from meshnode.worker.precompile import MIN_SESSION_CACHE, session_cache_length, step_shapes


def session_programs(prompt: int, new_tokens: int) -> set[tuple]:
    """The programs a session runs on a worker, as SpanRunner.forward picks them: a prefill
    of the padded prompt, then one decode program per attended cache prefix."""
    cache = session_cache_length(prompt + new_tokens)
    padded = bucket_length(prompt)
    programs = {("prefill", cache, padded if padded <= cache else prompt)}
    for position in range(prompt, prompt + new_tokens - 1):
        programs.add(("decode", cache, min(cache, bucket_length(position + 1))))
    return programs


def as_programs(shapes) -> set[tuple]:
    programs = set()
    for shape in shapes:
        if shape.positions == 1 and shape.start > 0:
            programs.add(("decode", shape.cache, min(shape.cache, bucket_length(shape.start + 1))))
        else:
            programs.add(("prefill", shape.cache, shape.positions))
    return programs


@pytest.mark.parametrize(
    ("prompt", "new_tokens"),
    [(1, 8), (2, 64), (9, 64), (16, 1), (17, 100), (31, 64), (64, 64), (65, 8), (100, 8),
     (100, 64), (128, 128), (129, 64), (192, 64), (200, 56)],
)
def test_sessions_up_to_256_positions_find_their_programs_compiled(prompt, new_tokens):
    """When a session of up to 256 positions starts, whatever its prompt length and new
    tokens, then each program it runs is one the worker compiled ahead."""
    assert session_programs(prompt, new_tokens) <= as_programs(step_shapes(2048))


def test_short_sessions_share_one_cache_length():
    """When sessions are shorter than MIN_SESSION_CACHE, then they all get that cache length
    (so their programs are the same); longer ones round up as before."""
    assert {session_cache_length(n) for n in (1, 17, 100, MIN_SESSION_CACHE)} == {256}
    assert session_cache_length(257) == 512


def test_nothing_past_the_workers_max_length():
    """When a worker accepts at most 100 positions, then no prefill longer than that
    length's bucket is compiled."""
    assert max(s.positions for s in step_shapes(100)) == 128
    assert max(s.positions for s in step_shapes(64)) == 64
    assert len(step_shapes(2048)) == 11
