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
    add_swarm_option,
    parsed_by,
)
from meshnode.errors import MeshError
from meshnode.inference.records import BlockSpan
from meshnode.worker.admission import DEFAULT_OPEN_WAIT
from meshnode.worker.service import (
    DEFAULT_CACHE_TOKENS,
    DEFAULT_MAX_LENGTH,
    WorkerOptions,
    WorkerService,
)
from meshnode.worker.sessions import DEFAULT_IDLE_TIMEOUT, DEFAULT_RECLAIM_IDLE

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
    add_swarm_option(parser)
    parser.add_argument(
        "--no-precompile",
        action="store_true",
        help="do not compile the step programs of common prompt lengths in the background",
    )
    parser.add_argument(
        "--no-batching",
        action="store_true",
        help="run one session's step at a time, each over its own cache (no shared batches)",
    )
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
    parser.add_argument(
        "--reclaim-after",
        type=float,
        default=DEFAULT_RECLAIM_IDLE,
        metavar="S",
        help="when the cache budget is full, free sessions not stepped for S seconds, "
        f"least recently stepped first (default: {DEFAULT_RECLAIM_IDLE:g})",
    )
    parser.add_argument(
        "--open-wait",
        type=float,
        default=DEFAULT_OPEN_WAIT,
        metavar="S",
        help="a session that does not fit waits up to S seconds for room before "
        f"no_capacity (default: {DEFAULT_OPEN_WAIT:g})",
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
        announce_address=args.announce_address,
        cache_tokens=args.cache_tokens,
        max_length=args.max_length,
        idle_timeout=args.idle_timeout,
        swarm=args.swarm,
        reclaim_idle=args.reclaim_after,
        open_wait=args.open_wait,
        precompile=not args.no_precompile,
        batching=not args.no_batching,
        metrics_port=args.metrics_port,
    )


def make_service(args: argparse.Namespace, reactor: Any) -> WorkerService:
    """Only builds: JAX, the compile cache and the native kernels start with the service
    (twistd forks in between, and a fork must not find threads running)."""
    return WorkerService(options_from_args(args), reactor)


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    service = make_service(args, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    if service.failure is not None:  # a named error (bad flags, no peer answered): 2
        return 2 if service.failure.check(MeshError) else 1
    return 0 if service.endpoint is not None else 1
