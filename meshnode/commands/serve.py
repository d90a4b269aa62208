"""``meshnode serve``: the OpenAI-compatible HTTP API, the swarm monitor and metrics.

The flags are defined once here and used by both ``meshnode serve`` (which
runs the reactor itself) and ``twistd meshnode serve`` (``meshnode/tap.py``).
The server itself is ``meshnode.serve.app.ServeService``.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshnode.client.defaults import DEFAULT_VERIFY_RATE
from meshnode.commands.options import (
    add_bootstrap_option,
    add_client_identity_options,
    add_model_option,
    add_verify_option,
)

DEFAULT_PORT = 8000
#: meshnode.serve.bounded.DEFAULT_MAX_BODY, not imported: twisted.web would slow every command
DEFAULT_MAX_BODY = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bootstrap_option(parser)
    add_model_option(parser, "model to serve: the one the mesh's workers serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"HTTP port (default: {DEFAULT_PORT}; 0: ephemeral)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1, /api/swarm and /metrics")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, metavar="BYTES",
                        help=f"refuse request bodies over BYTES with 413 "
                             f"(default: {DEFAULT_MAX_BODY})")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the model id clients use (default: --model, or the model's name)")
    add_client_identity_options(parser)
    add_verify_option(parser, DEFAULT_VERIFY_RATE)


def make_service(args: argparse.Namespace, reactor: Any) -> Any:
    # builds only: nothing that starts a thread (JAX, the compile cache) before twistd forks
    from meshnode.serve.app import ServeOptions, ServeService

    options = ServeOptions(model=args.model, bootstrap=list(args.bootstrap), host=args.host,
                           port=args.port, api_key=args.api_key, model_name=args.model_name,
                           swarm=args.swarm, data_dir=args.data_dir,
                           verify_rate=args.verify_rate, max_body=args.max_body)
    return ServeService(options, reactor)


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from meshnode.errors import ClientError

    if args.max_body < 1:
        raise ClientError("--max-body must be at least 1 byte")
    if not args.bootstrap:
        raise ClientError("meshnode serve needs --bootstrap HOST:PORT[#ID]")
    service = make_service(args, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 1 if service.failure is not None else 0
