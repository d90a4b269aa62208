"""``meshnode status``: which workers serve which blocks of a model, and whether all are covered.

    meshnode status --bootstrap 127.0.0.1:7000#ab12... --model smollm2 [--json]

Exit status 0 when every block has an online worker, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshnode.client.routing.route import candidates_from_records
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


def coverage_report(
    records: dict[int, dict[bytes, Any]], num_layers: int, model: str
) -> dict[str, Any]:
    """Workers (by id) and per-block coverage, from the DHT records (pure)."""
    workers = candidates_from_records(records)
    rows = []
    for node_id, info in sorted(workers.items(), key=lambda kv: (kv[1].span, kv[0])):
        rows.append(
            {
                "worker": node_id.hex(),
                "address": info.address,
                "span": info.span.to_wire(),
                "state": info.state.value,
                "throughput": info.throughput,
                "cache_tokens": info.cache_tokens,
                "dtype": info.dtype,
                "same_model": info.model == model,
            }
        )
    served = [
        sorted(n.hex() for n, i in records.get(b, {}).items() if eligible(i, model, num_layers))
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
    report = coverage_report(records, source.config.num_layers, source.fingerprint)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report, source.name)
    return 0 if report["covered"] else 1


def _print(report: dict[str, Any], name: str) -> None:
    print(f"model {name} ({report['model'][:16]}), {report['num_blocks']} blocks")
    for row in report["workers"]:
        other = "" if row["same_model"] else "  (another model)"
        print(
            f"  {row['worker'][:12]}  {row['address'].split('#')[0]:<21} "
            f"blocks {row['span'][0]}:{row['span'][1]:<4} {row['state']:<7} "
            f"{row['throughput']:8.1f} tok/s  {row['cache_tokens']:7d} cache tokens{other}"
        )
    if report["covered"]:
        print("every block is covered")
    else:
        print(f"blocks not covered: {', '.join(map(str, report['missing']))}")
