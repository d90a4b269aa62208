"""``meshnode status``: which workers serve which blocks of a model, and whether all are covered.

    meshnode status --bootstrap 127.0.0.1:7000#ab12... --model smollm2 [--json]

The workers come from the DHT's block records; each online one is then asked
(``infer.info``, as route discovery does): one that does not answer is shown
``unreachable`` (a record outlives its worker by up to its ttl), and only
workers that answer count as covering their blocks. Exit status 0 when every
block has a worker that answers, 1 otherwise, 2 when the DHT cannot be joined.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet.defer import Deferred

from meshnode.client.routing.discovery import measure_rtts
from meshnode.client.routing.route import candidates_from_records, span_text
from meshnode.commands.options import (
    add_bootstrap_option,
    add_client_identity_options,
    add_model_option,
)
from meshnode.errors import ClientError
from meshnode.inference.records import eligible


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bootstrap_option(parser)
    add_model_option(parser, "the model whose blocks to show")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_identity_options(parser)


#: what status shows for an online worker that did not answer its ping
UNREACHABLE = "unreachable"


def coverage_report(
    records: dict[int, dict[bytes, Any]],
    num_layers: int,
    model: str,
    rtts: dict[bytes, float] | None = None,
) -> dict[str, Any]:
    """Workers (by id) and per-block coverage, from the DHT records and the round trips of
    the workers that answered (pure); ``rtts`` None: nobody was asked, all count."""
    workers = candidates_from_records(records)

    def answers(node_id: bytes) -> bool:
        return rtts is None or node_id in rtts

    rows = []
    for node_id, info in sorted(workers.items(), key=lambda kv: (kv[1].span, kv[0])):
        state = info.state.value if not info.online or answers(node_id) else UNREACHABLE
        rows.append(
            {
                "worker": node_id.hex(),
                "address": info.address,
                "span": info.span.to_wire(),
                "state": state,
                "rtt_ms": None if rtts is None or node_id not in rtts else rtts[node_id] * 1e3,
                "max_length": info.max_length,
                "throughput": info.throughput,
                "cache_tokens": info.cache_tokens,
                "dtype": info.dtype,
                "same_model": info.model == model,
            }
        )
    served = [
        sorted(
            n.hex()
            for n, i in records.get(b, {}).items()
            if eligible(i, model, num_layers) and answers(n)
        )
        for b in range(num_layers)
    ]
    missing = [b for b, ids in enumerate(served) if not ids]
    return {
        "model": model,
        "num_blocks": num_layers,
        "workers": rows,
        "blocks": served,
        "covered": not missing,
        "missing": missing,
    }


def run(args: argparse.Namespace) -> int:
    from meshnode.client.api import background_client, call

    if not args.bootstrap:
        raise ClientError("status needs --bootstrap HOST:PORT[#ID]")
    client = background_client(args.bootstrap, args.model, swarm=args.swarm,
                               data_dir=args.data_dir)
    records = call(client.block_records)
    source = client.source
    online = {n: i for n, i in candidates_from_records(records).items() if i.online}
    rtts = call(lambda: Deferred.fromCoroutine(
        measure_rtts(client.endpoint, client.reactor, online)
    ))
    report = coverage_report(records, source.config.num_layers, source.fingerprint, rtts)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report, source.name)
    return 0 if report["covered"] else 1


def _print(report: dict[str, Any], name: str) -> None:
    print(f"model {name} ({report['model'][:16]}), {report['num_blocks']} blocks")
    for row in report["workers"]:
        other = "" if row["same_model"] else "  (another model)"
        rtt = "" if row["rtt_ms"] is None else f"  rtt {row['rtt_ms']:.0f} ms"
        span = f"{row['span'][0]}:{row['span'][1]}"
        print(
            f"  {row['worker'][:12]}  {row['address'].split('#')[0]:<21} "
            f"blocks {span:<7} {row['state']:<11} "
            f"{row['throughput']:8.1f} tok/s  {row['cache_tokens']:7d} cache tokens{rtt}{other}"
        )
    if report["covered"]:
        print("every block is covered by a worker that answers")
    else:
        print(f"blocks not covered by a worker that answers: {span_text(report['missing'])}")
