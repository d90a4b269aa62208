"""The step programs a worker compiles ahead: every program of a session up to 256 positions."""

from __future__ import annotations

import pytest

from meshnode.model.buckets import bucket_length
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


def paged_programs(prompt: int, table_positions: int, prefix_free: bool) -> set[tuple]:
    """The programs a batching worker runs for a prompt then decode rows of any batch, as
    SharedCache.run picks them: chunks of at most CHUNK, padded, over a bucketed prefix (with
    the native kernel's ``prefix_free``: over the whole table)."""
    from meshnode.compute import ROW_BUCKETS
    from meshnode.model.buckets import CHUNK, CHUNK_BUCKETS

    programs = {(rows, 1, table_positions) for rows in ROW_BUCKETS}
    for start in range(0, prompt, CHUNK):
        padded = bucket_length(min(CHUNK, prompt - start), CHUNK_BUCKETS)
        prefix = min(bucket_length(start + padded), table_positions)
        programs.add((1, padded, table_positions if prefix_free else prefix))
    return programs


@pytest.mark.parametrize("prefix_free", [False, True], ids=["xla", "native"])
@pytest.mark.parametrize("prompt", [2, 16, 17, 100, 256, 300, 511, 1000, 1800, 2047])
def test_a_batching_worker_finds_its_programs_compiled(prompt, prefix_free):
    """When a batching worker (page tables of 2048 positions) runs a prompt of more than one
    position, cut in chunks, then decode rows in any batch, then every program it runs but
    a last chunk of a single position is one it compiled ahead; where the native kernel
    reads each query's prefix, a chunk length is one program whatever its prefix."""
    from meshnode.worker.precompile import paged_shapes

    shapes = paged_shapes(2048, prefix_free)
    compiled = {(s.batch, s.positions, s.kv_length) for s in shapes}
    needed = {p for p in paged_programs(prompt, 2048, prefix_free)
              if p[1] > 1 or p[0] > 1 or p[2] == 2048}
    assert needed <= compiled
    if prefix_free:
        assert len(shapes) == len(set(shapes)) == 7 + 5  # row buckets, chunk lengths 16-256


@pytest.mark.slow
def test_a_worker_compiles_every_paged_program_in_the_background(tiny_checkpoint, tiny_local,
                                                                tmp_path):
    """When a batching worker process starts with precompiling on (the default outside the
    test suite), then it says it compiled every program of its page tables in the
    background, and then serves a generation equal to local generation."""
    import json
    import re
    import subprocess
    import sys

    from meshnode import native
    from meshnode.testing.processes import LocalMesh
    from meshnode.worker.precompile import paged_shapes
    from tests.mesh.mesh_helpers import prompts

    with LocalMesh(str(tiny_checkpoint), root=tmp_path, precompile=True) as mesh:
        mesh.start_worker("0:6", ["--max-length", "512"])  # the tiny model's longest
        assert mesh.wait_precompiled(300), mesh.workers()[0].log_tail()
        said = re.search(r"precompiled (\d+) step programs", mesh.workers()[0].log_tail(400))
        assert said and int(said.group(1)) == len(paged_shapes(512, native.load())), said
        ids = prompts(1, 128, seed=5)[0]
        done = subprocess.run(
            [sys.executable, "-m", "meshnode", "generate", "--model", str(tiny_checkpoint),
             "--bootstrap", str(mesh.join_address), "--prompt-ids", ",".join(map(str, ids)),
             "--max-new-tokens", "6", "--json"],
            capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    local = tiny_local.generate(prompt_ids=ids, max_new_tokens=6)
    assert json.loads(done.stdout)["token_ids"] == list(local.token_ids)
