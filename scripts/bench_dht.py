#!/usr/bin/env python
"""Benchmark the DHT on loopback: lookup rounds, FIND_VALUE latency and bytes per lookup.

For each swarm size, starts that many DHT nodes in this process over real
mutual TLS (ephemeral ports), joins them one by one through the first, has
every node store one record, then runs, one at a time so latencies do not
overlap:

- one value lookup (``DHTNode.get``) per node, of a record stored by another
  node: rounds, wall-clock latency, bytes;
- one node lookup (``DHTNode.find_closest``) per node of a random id: rounds.

"bytes sent" is the framed size of the lookup's requests (wire prefix + CBOR
header, before TLS); "wire bytes" cross-checks it with the Endpoint's own
per-connection counters (they also count the answers to requests from others
and pings, so they may be a little higher).

    scripts/bench_dht.py                 # 16, 64, 128 nodes, a table
    scripts/bench_dht.py --sizes 16 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

# Run from a checkout: use its meshnode (a strict editable install lists files).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCH_MODEL = "bench-model"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def wire_bytes_sent(swarm, index: int) -> int:
    stats = swarm.endpoints[index].connection_stats().values()
    return sum(s.bytes_sent for s in stats)


async def measure(reactor, size: int, seed: int) -> dict:
    from meshnode.dht.network import block_key
    from meshnode.dht.swarm import LocalSwarm

    rng = random.Random(seed)
    started = time.perf_counter()
    swarm = await LocalSwarm.start(reactor, size)
    join_seconds = time.perf_counter() - started
    try:
        expiration = reactor.seconds() + 600
        for start in range(0, size, 16):
            await gatherResults(
                [
                    swarm.nodes[i].store(block_key(BENCH_MODEL, i), {"writer": i}, expiration)
                    for i in range(start, min(size, start + 16))
                ],
                consumeErrors=True,
            )
        rounds, latencies, sent, received, requests, wire, misses = [], [], [], [], [], [], 0
        for i, node in enumerate(swarm.nodes):
            other = (i + 1 + rng.randrange(size - 1)) % size
            before = wire_bytes_sent(swarm, i)
            t0 = time.perf_counter()
            found = await node.get(block_key(BENCH_MODEL, other))
            latencies.append((time.perf_counter() - t0) * 1000.0)
            wire.append(wire_bytes_sent(swarm, i) - before)
            stats = node.last_lookup.stats
            misses += swarm.nodes[other].node_id not in found
            rounds.append(stats.rounds)
            sent.append(stats.bytes_sent)
            received.append(stats.bytes_received)
            requests.append(stats.requests)
        node_rounds = []
        for node in swarm.nodes:
            result = await node.find_closest(rng.randbytes(32))
            node_rounds.append(result.stats.rounds)
    finally:
        await swarm.stop()
    target = math.ceil(math.log2(size)) / 2 + 1
    return {
        "nodes": size,
        "join_seconds": round(join_seconds, 2),
        "value_lookups": len(rounds),
        "misses": misses,
        "value_rounds_p50": statistics.median(rounds),
        "value_rounds_p95": percentile(rounds, 0.95),
        "value_rounds_max": max(rounds),
        "node_rounds_p50": statistics.median(node_rounds),
        "node_rounds_p95": percentile(node_rounds, 0.95),
        "target_rounds": target,
        "meets_target": statistics.median(rounds) <= target
        and statistics.median(node_rounds) <= target,
        "latency_ms_p50": round(statistics.median(latencies), 2),
        "latency_ms_p95": round(percentile(latencies, 0.95), 2),
        "requests_per_lookup": round(statistics.mean(requests), 2),
        "bytes_sent_per_lookup": round(statistics.mean(sent)),
        "bytes_received_per_lookup": round(statistics.mean(received)),
        "wire_bytes_sent_per_lookup": round(statistics.mean(wire)),
    }


COLUMNS = [
    ("nodes", "nodes"),
    ("value_rounds_p50", "rounds p50"),
    ("value_rounds_p95", "p95"),
    ("node_rounds_p50", "FIND_NODE rounds p50"),
    ("target_rounds", "target"),
    ("latency_ms_p50", "latency p50 ms"),
    ("latency_ms_p95", "p95 ms"),
    ("requests_per_lookup", "requests"),
    ("bytes_sent_per_lookup", "bytes sent"),
    ("wire_bytes_sent_per_lookup", "wire bytes sent"),
    ("bytes_received_per_lookup", "bytes received"),
    ("misses", "misses"),
]


def print_table(rows: list[dict]) -> None:
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for key, title in COLUMNS]
    print("  ".join(title.rjust(w) for (_, title), w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        cells = [str(row[key]).rjust(w) for (key, _), w in zip(COLUMNS, widths, strict=True)]
        print("  ".join(cells))
    print("value lookups: FIND_VALUE (get) of another node's record, one per node;")
    print("target: median rounds <= ceil(log2 N)/2 + 1; bytes are per lookup, means.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows: list[dict] = []

    async def run_all(reactor) -> None:
        for size in args.sizes:
            rows.append(await measure(reactor, size, args.seed))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_table(rows)

    task.react(lambda reactor: Deferred.fromCoroutine(run_all(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
