#!/usr/bin/env python
"""Ceiling: the decode tokens/s the kernels alone allow, B sessions a batch, in one process.

What a batched mesh could reach on this machine if messaging, Python, XLA's
runtime and sampling cost nothing: per token, one forward of every block at
B rows (the worker's paged program, `SharedCache.measure`, each row at
position 0 so attention is almost free) plus the client's head at B rows,
each using every core as it does in a worker. Compare with
`scripts/bench_load.py`'s aggregate (what the mesh reaches) and 4x its
one-session rate (issue 15's target):

    scripts/bench_ceiling.py                 # SmolLM2, B = 1, 8, 32
    scripts/bench_ceiling.py --rows 8 --one-session 70
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def head_ms(head, width: int, rows: int, repeats: int) -> float:
    """Median ms of the head's logits for ``rows`` rows."""
    import numpy as np

    hidden = np.random.default_rng(0).standard_normal((rows, 1, width)).astype(np.float32)
    head.logits(hidden).block_until_ready()
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        head.logits(hidden).block_until_ready()
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", default="1,8,32", help="sessions a batch")
    parser.add_argument("--steps", type=int, default=15, help="forwards a measurement")
    parser.add_argument("--one-session", type=float, default=None,
                        help="a one-session rate (tok/s) to set 4x of against the ceiling")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from meshnode.inference.records import BlockSpan
    from meshnode.model.head import ClientHead
    from meshnode.model.source import open_model
    from meshnode.model.span import SpanRunner
    from meshnode.worker.arena import SharedCache

    source = open_model(args.model)
    config = source.config
    blocks = BlockSpan(0, config.num_layers)
    runner = SpanRunner(config, source.load_span_params(0, config.num_layers, jnp.float32),
                        jnp.float32)
    cache = SharedCache(lambda span: runner, blocks, 64 * 256, 256)
    head = ClientHead(config, source.load_client_params(jnp.float32), jnp.float32)
    say = (lambda line: None) if args.json else print
    say(f"{source.name}: {config.num_layers} blocks and the head, kernels only, one process")
    say(f"{'B':>4}{'blocks ms/token':>17}{'head ms/token':>15}{'ceiling tok/s':>15}")
    report = []
    for rows in [int(r) for r in args.rows.split(",")]:
        cache.measure(rows, 2)  # compile and warm
        blocks_rate = statistics.median(cache.measure(rows, args.steps) for _ in range(5))
        blocks_ms = 1000 / blocks_rate
        per_token_head = head_ms(head, config.hidden_size, rows, 5 * args.steps) / rows
        ceiling = 1000 / (blocks_ms + per_token_head)
        line = f"{rows:>4}{blocks_ms:>17.3f}{per_token_head:>15.3f}{ceiling:>15.1f}"
        if args.one_session:
            line += f"   4x {args.one_session:g} tok/s = {400 * args.one_session / ceiling:.0f} %"
        say(line)
        report.append({"rows": rows, "blocks_ms_per_token": blocks_ms,
                       "head_ms_per_token": per_token_head, "ceiling_tokens_per_s": ceiling})
    if args.json:
        print(json.dumps({"model": source.name, "blocks": config.num_layers, "rows": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
