#!/usr/bin/env python
"""Load: many concurrent sessions through a mesh of worker processes, all checked.

Starts a bootstrap node and one worker process per ``--spans`` entry, then one
client runs ``--sessions`` greedy generations of ``--new-tokens`` tokens at
once (random prompts of 3-20 ids, seeded). Reports aggregate tokens/s (all new
tokens / wall time of the whole batch) and the p50 / p99 time per token (the
gaps between consecutive tokens of a session, all sessions together), then
checks every output against local greedy generation of the same model.

In the same run, against the same workers, it first measures one session
alone (the single-session rate the aggregate is compared with), and with
``--prefill 128,1800`` the prefill rate of prompts of those lengths (prompt
tokens / time to the first token, warm: each measured twice, the second
kept), through the mesh and locally (all blocks in this process). It waits
for the workers' background precompiling to end before measuring.
``--worker-args=--no-batching`` runs the same load on workers that take one
step at a time (the behaviour before continuous batching).

    scripts/bench_load.py                      # SmolLM2, 32 x 200 through 0:10, 10:20, 20:30
    scripts/bench_load.py --sessions 16 --new-tokens 64 --prefill 128,1800
    scripts/bench_load.py --sessions 8 --new-tokens 50 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Run from a checkout: use its meshnode and the resilience tests' helpers.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--spans", default="0:10,10:20,20:30", help="one worker per span")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the local reference")
    parser.add_argument("--no-single", action="store_true",
                        help="skip the one-session baseline")
    parser.add_argument("--prefill", default="", help="prompt lengths to time, e.g. 128,1800")
    parser.add_argument("--worker-args", default="", help="extra worker options, space separated")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser.parse_args(argv)


def random_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(3, 21))).tolist() for _ in range(count)]


async def measure(reactor, args: argparse.Namespace) -> None:
    from meshnode.client.api import MeshClient
    from meshnode.testing.processes import LocalMesh
    from tests.resilience.load_probe import run_load

    root = Path(tempfile.mkdtemp(prefix="meshnode-bench-load-"))
    with LocalMesh(args.model, root=root) as mesh:
        mesh.start_bootstrap()
        extra = args.worker_args.split()
        nodes = [mesh.start_worker(span, extra, wait=False) for span in args.spans.split(",")]
        for node in nodes:
            node.wait_ready()
        if not mesh.wait_precompiled():
            print("workers still precompiling: measuring anyway", file=sys.stderr)
        client = MeshClient(reactor, [mesh.join_address], args.model, max_concurrent=args.sessions)
        await client.start()
        try:
            await client.wait_for_route(60)
            vocab = client.source.config.vocab_size
            batch = random_prompts(args.sessions, vocab, args.seed)
            single = None
            await run_load(client, reactor, batch[:1], 4)  # warm the decode programs
            if not args.no_single:
                single = await run_load(client, reactor, batch[:1], args.new_tokens)
            load = await run_load(client, reactor, batch, args.new_tokens)
            route = client.last_route.describe()
            prefill = {n: await prefill_rate(client, reactor, vocab, n) for n in lengths(args)}
        finally:
            await client.close()
    report = {
        "model": args.model,
        "workers": args.spans.split(","),
        "sessions": args.sessions,
        "new_tokens": args.new_tokens,
        "tokens": load.total_tokens,
        "seconds": load.seconds,
        "tokens_per_second": load.tokens_per_second,
        "p50_ms_per_token": 1000 * load.gap_percentile(0.5),
        "p99_ms_per_token": 1000 * load.gap_percentile(0.99),
        "route": route,
    }
    if single is not None:
        report["single_tokens_per_second"] = single.tokens_per_second
        report["speedup"] = load.tokens_per_second / max(single.tokens_per_second, 1e-9)
    if prefill:
        report["prefill_mesh_tokens_per_second"] = prefill
        report["prefill_local_tokens_per_second"] = local_prefill(args.model, lengths(args))
    if not args.no_check:
        report["mismatches"] = check(args.model, batch, load.tokens, args.new_tokens)
    print_report(report, args.json)
    if report.get("mismatches"):
        raise SystemExit(1)


def lengths(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.prefill.split(",") if n]


async def prefill_rate(client, reactor, vocab: int, length: int) -> float:
    """Prompt tokens per second to the first token, the second of two runs."""
    from meshnode.client.generate import GenerationOptions

    (prompt,) = random_prompts(1, vocab, length)
    prompt = (prompt * (length // len(prompt) + 1))[:length]
    for _ in range(2):
        began = reactor.seconds()
        await client.generate_ids(prompt, GenerationOptions(max_new_tokens=1))
        seconds = reactor.seconds() - began
    return length / seconds


def local_prefill(model: str, sizes: list[int]) -> dict[int, float]:
    """The same, with every block in this process (LocalModel's prefill_s)."""
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    local = LocalModel.load(open_model(model))
    rates = {}
    for length in sizes:
        prompt = list(range(1, length + 1))
        for _ in range(2):
            result = local.generate(prompt_ids=prompt, max_new_tokens=1)
        rates[length] = length / result.prefill_s
    return rates


def check(model: str, batch: list[list[int]], outputs: list[list[int]], new_tokens: int) -> int:
    """Sessions whose tokens differ from local greedy generation."""
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    local = LocalModel.load(open_model(model))
    return sum(
        list(local.generate(prompt_ids=ids, max_new_tokens=new_tokens).token_ids) != tokens
        for ids, tokens in zip(batch, outputs)
    )


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    print(
        f"{report['sessions']} sessions x {report['new_tokens']} new tokens of "
        f"{report['model']} through workers {', '.join(report['workers'])}"
    )
    print(
        f"  {report['tokens']} tokens in {report['seconds']:.1f} s: "
        f"{report['tokens_per_second']:.1f} tokens/s aggregate"
    )
    print(
        f"  time per token: p50 {report['p50_ms_per_token']:.1f} ms, "
        f"p99 {report['p99_ms_per_token']:.1f} ms"
    )
    if "single_tokens_per_second" in report:
        print(f"  one session alone, same workers: {report['single_tokens_per_second']:.1f} "
              f"tokens/s; aggregate {report['speedup']:.2f}x that")
    for where in ("mesh", "local"):
        rates = report.get(f"prefill_{where}_tokens_per_second", {})
        for length, rate in rates.items():
            print(f"  prefill of {length} tokens, {where}: {rate:.0f} tokens/s")
    if "mismatches" in report:
        print(
            f"  outputs equal to local greedy: {report['sessions'] - report['mismatches']}"
            f" of {report['sessions']}"
        )


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    args = parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(measure(reactor, args)))


if __name__ == "__main__":
    main()
