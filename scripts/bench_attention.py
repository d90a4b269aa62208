#!/usr/bin/env python
"""The paged decode attention kernel over SmolLM2's shapes, its cache cold and warm.

    .venv/bin/python scripts/bench_attention.py [--rows 1,8,32] [--positions 110,210,420]
                                                [--layers 10] [--json]

One call per layer of ``--layers`` layers (a worker's span of 10 blocks), B rows
each at one position, over an arena of pages shaped as SmolLM2's (9 query heads,
3 kv heads of 64): the kernel a worker's decode step runs
(``meshnode/native/attention.cc``, ``PagedAttention``).

- ``cold``: every timed call reads pages it has not read for a while, from an
  arena far larger than the CPU's caches. That is a worker's case under load:
  between two steps of a session, the other sessions' caches and every process's
  weights have gone through the caches.
- ``warm``: the same pages call after call, what a microbenchmark of one
  session sees: they stay in the CPU's caches where they fit (one row; not 8
  rows of 210 positions, 26 MB over 10 layers).

It reports ms per call of all layers, ms per row, and the keys and values read
per second. Each figure is the median of ``--calls`` timed calls; the machine's
load makes them indicative only: compare codes in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from meshnode import native
from meshnode.model.layers.attention import paged_decode_attention
from meshnode.model.paged import PAGE

#: SmolLM2-135M's attention: query heads, kv heads, head dim
HEADS, KV_HEADS, DIM = 9, 3, 64
#: arena bytes, keys and values together: well past any last-level cache
ARENA_BYTES = 1 << 31
#: table sets the cold calls cycle through
COLD_SETS = 12


def layers_program(layers: int):
    """One jitted call of the kernel per layer (as a span's forward runs them)."""
    @jax.jit
    def run(q, k, v, positions, tables):
        out = q
        for layer in range(layers):
            out = out + paged_decode_attention(q, k, v, layer, positions, tables, 0)
        return out
    return run


def measure(rows: int, position: int, layers: int, calls: int, rng) -> dict:
    pages_per_row = -(-(position + 1) // PAGE)
    page_bytes = PAGE * KV_HEADS * DIM * 4
    pages = max(ARENA_BYTES // (2 * layers * page_bytes), rows * pages_per_row * COLD_SETS + 1)
    shape = (layers, pages, PAGE, KV_HEADS, DIM)
    k = jnp.asarray(rng.standard_normal(shape, np.float32))
    v = jnp.asarray(rng.standard_normal(shape, np.float32))
    q = jnp.asarray(rng.standard_normal((rows, HEADS, DIM), np.float32))
    positions = jnp.full((rows,), position, jnp.int32)
    tables = [
        jnp.asarray(rng.permutation(np.arange(1, pages))[: rows * pages_per_row]
                    .reshape(rows, pages_per_row).astype(np.int32))
        for _ in range(COLD_SETS)
    ]
    run = layers_program(layers)
    jax.block_until_ready(run(q, k, v, positions, tables[0]))
    figures = {"rows": rows, "position": position, "layers": layers}
    for label, pick in (("cold", lambda i: tables[i % COLD_SETS]), ("warm", lambda i: tables[0])):
        timings = []
        for i in range(calls):
            table = pick(i + 1)
            began = time.perf_counter()
            jax.block_until_ready(run(q, k, v, positions, table))
            timings.append(time.perf_counter() - began)
        seconds = statistics.median(timings)
        read = 2 * rows * layers * (position + 1) * KV_HEADS * DIM * 4
        figures[f"{label}_ms"] = seconds * 1e3
        figures[f"{label}_ms_per_row"] = seconds * 1e3 / rows
        figures[f"{label}_gb_per_s"] = read / seconds / 1e9
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--positions", default="110,210,420")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not native.load():
        print(f"native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    report = [measure(int(b), int(p), args.layers, args.calls, rng)
              for b in args.rows.split(",") for p in args.positions.split(",")]
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "figures": report}))
        return 0
    print(f"{'B':>4}{'position':>10}{'cold ms':>10}{'ms/row':>9}{'GB/s':>7}"
          f"{'warm ms':>10}{'ms/row':>9}{'GB/s':>7}   ({args.layers} layers)")
    for f in report:
        print(f"{f['rows']:>4}{f['position']:>10}{f['cold_ms']:>10.3f}"
              f"{f['cold_ms_per_row']:>9.3f}{f['cold_gb_per_s']:>7.1f}{f['warm_ms']:>10.3f}"
              f"{f['warm_ms_per_row']:>9.3f}{f['warm_gb_per_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
