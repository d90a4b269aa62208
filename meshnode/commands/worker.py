"""``meshnode worker``: serve a span of transformer blocks to the mesh.

The flags are defined once here and used by both ``meshnode worker`` (which
runs the reactor itself) and ``twistd meshnode worker`` (``meshnode/tap.py``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from meshnode.commands.options import (
    add_bootstrap_option,
    add_listen_options,
    add_model_option,
    parsed_by,
)
from meshnode.errors import MeshError
from meshnode.inference.records import BlockSpan
from meshnode.worker.service import (
    DEFAULT_CACHE_TOKENS,
    DEFAULT_MAX_LENGTH,
    WorkerOptions,
    WorkerService,
)
from meshnode.worker.sessions import DEFAULT_IDLE_TIMEOUT

block_span = parsed_by(BlockSpan.parse)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bootstrap_option(parser)
    add_model_option(parser, "model to serve")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=block_span, metavar="A:B", help="serve blocks A to B-1")
    span.add_argument(
        "--num-blocks",
        type=int,
        metavar="N",
        help="serve the N blocks least served in the mesh now (default: all)",
    )
    add_listen_options(parser, "node key and state (default: a new temporary folder)")
    _add_session_limits(parser)
    parser.add_argument("--metrics-port", type=int, default=None, metavar="N",
                        help="serve Prometheus metrics at http://HOST:N/metrics (0: ephemeral)")


def _add_session_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=DEFAULT_CACHE_TOKENS,
        metavar="N",
        help=f"KV cache budget in tokens (default: {DEFAULT_CACHE_TOKENS})",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        metavar="N",
        help=f"longest session accepted (default: {DEFAULT_MAX_LENGTH})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="S",
        help=f"close sessions idle for S seconds (default: {DEFAULT_IDLE_TIMEOUT:g})",
    )


def options_from_args(args: argparse.Namespace) -> WorkerOptions:
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="meshnode-worker-"))
    if args.num_blocks is not None and args.num_blocks < 1:
        raise MeshError("--num-blocks must be at least 1")
    return WorkerOptions(
        model=args.model,
        data_dir=data_dir,
        bootstrap=list(args.bootstrap),
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        host=args.host,
        port=args.port,
        cache_tokens=args.cache_tokens,
        max_length=args.max_length,
        idle_timeout=args.idle_timeout,
        metrics_port=args.metrics_port,
    )


def make_service(args: argparse.Namespace, reactor: Any) -> WorkerService:
    from meshnode.model.compile_cache import enable_compile_cache

    enable_compile_cache()
    return WorkerService(options_from_args(args), reactor)


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    service = make_service(args, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 1 if service.failure is not None or service.endpoint is None else 0
