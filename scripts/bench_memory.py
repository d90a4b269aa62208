#!/usr/bin/env python
"""Measure a worker process's resident memory against what it hosts.

Starts a bootstrap node and one worker process serving ``--blocks`` of
``--model`` with a cache budget of ``--cache-tokens``, then reports (psutil
RSS of the worker process):

- at rest after start (weights loaded, warmed up, its background step
  programs compiled, no session);
- after the first ``--warm`` sessions and after all ``--sessions`` (each
  opened, prefilled, stepped twice and closed, 8 at a time, over a few
  prompt lengths so that every compiled shape is met early);
- at rest at the end;

next to the hosted weights (the span's parameters as loaded: quantized blocks where
the native kernels run, else float32), the cache
budget in bytes (tokens x blocks x K,V x kv heads x head dim x 4) and the
runtime overhead (RSS at rest minus weights).

    scripts/bench_memory.py                                 # SmolLM2, all 30 blocks
    scripts/bench_memory.py --model PATH --blocks 0:6 --sessions 500 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout: use its meshnode and the resilience tests' probe.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--blocks", default=None, help="A:B (default: every block)")
    parser.add_argument("--cache-tokens", type=int, default=4096)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser.parse_args(argv)


async def measure(reactor, args: argparse.Namespace) -> None:
    from meshnode.client.api import MeshClient
    from meshnode.inference.records import BlockSpan
    from meshnode.model.source import open_model
    from meshnode.testing.processes import LocalMesh
    from tests.resilience.memory_probe import churn, direct_route, footprint, rss

    source = open_model(args.model)
    span = BlockSpan.parse(args.blocks) if args.blocks else BlockSpan(0, source.config.num_layers)
    bounds = footprint(source, span, args.cache_tokens)
    report: dict = {
        "model": source.name,
        "span": str(span),
        "cache_tokens": args.cache_tokens,
        "sessions": args.sessions,
        "warm": args.warm,
        "weights_mib": bounds.weights_bytes / MIB,
        "cache_budget_mib": bounds.cache_budget_bytes / MIB,
    }
    root = Path(tempfile.mkdtemp(prefix="meshnode-bench-memory-"))
    with LocalMesh(args.model, root=root) as mesh:
        mesh.start_bootstrap()
        worker = mesh.start_worker(str(span), extra=["--cache-tokens", str(args.cache_tokens)])
        # its step programs compile in the background: they are part of "at rest", not growth
        if not mesh.wait_precompiled():
            print("worker still precompiling: measuring anyway", file=sys.stderr)
        report["rss_at_start_mib"] = rss(worker.pid) / MIB
        report["bootstrap_rss_mib"] = rss(mesh.bootstrap.pid) / MIB
        client = MeshClient(reactor, [mesh.join_address], args.model)
        await client.start()
        try:
            model, hidden = client.source.fingerprint, source.config.hidden_size
            route = direct_route(worker.address, span, model)
            began = time.perf_counter()
            await churn(client.endpoint, route, model, hidden, 0, args.warm)
            report["rss_after_warm_mib"] = rss(worker.pid) / MIB
            await churn(client.endpoint, route, model, hidden, args.warm, args.sessions - args.warm)
            report["rss_after_all_mib"] = rss(worker.pid) / MIB
            report["churn_seconds"] = time.perf_counter() - began
        finally:
            await client.close()
        report["rss_at_rest_mib"] = rss(worker.pid) / MIB
    report["runtime_overhead_mib"] = report["rss_at_start_mib"] - report["weights_mib"]
    report["churn_growth_pct"] = 100 * (
        report["rss_after_all_mib"] / report["rss_after_warm_mib"] - 1
    )
    print_report(report, args.json)


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    print(
        f"worker of {report['model']} blocks {report['span']}, "
        f"cache budget {report['cache_tokens']} tokens"
    )
    print(f"  hosted weights               {report['weights_mib']:9.1f} MiB")
    print(f"  cache budget                 {report['cache_budget_mib']:9.1f} MiB")
    print(f"  RSS at start (at rest)       {report['rss_at_start_mib']:9.1f} MiB")
    print(
        f"  runtime overhead             {report['runtime_overhead_mib']:9.1f} MiB"
        "  (RSS at start - weights)"
    )
    print(f"  RSS after {report['warm']:>4} sessions       {report['rss_after_warm_mib']:9.1f} MiB")
    print(
        f"  RSS after {report['sessions']:>4} sessions       {report['rss_after_all_mib']:9.1f} MiB"
        f"  ({report['churn_growth_pct']:+.2f}% vs warm-up, {report['churn_seconds']:.1f} s)"
    )
    print(f"  RSS at rest at the end       {report['rss_at_rest_mib']:9.1f} MiB")
    print(f"  bootstrap node RSS           {report['bootstrap_rss_mib']:9.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    args = parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(measure(reactor, args)))


if __name__ == "__main__":
    main()
