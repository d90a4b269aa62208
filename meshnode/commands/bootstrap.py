"""``meshnode bootstrap``: run a DHT node that others join.

    meshnode bootstrap --host 0.0.0.0 --port 7000 --data-dir ~/.meshnode/seed
    meshnode bootstrap --port 7001 --bootstrap 10.0.0.1:7000#<id>
    meshnode bootstrap --port 7000 --announce-address seed.example.org:443

Prints its pinned address ``host:port#<node id>`` on start: the announced one
when ``--announce-address`` is given (what others pass to ``--bootstrap``). The flags are
defined once here and used by both ``meshnode bootstrap`` (which runs the
reactor itself) and ``twistd meshnode bootstrap`` (``meshnode/tap.py``, through
``make_service``).
"""

from __future__ import annotations

import argparse
from typing import Any

from meshnode.commands.options import add_bootstrap_option, add_listen_options, add_swarm_option
from meshnode.dht.service import DHTService, DHTServiceOptions, build_dht_service


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_listen_options(
        parser, "keep the node key here, so the node id survives restarts (default: a new id)"
    )
    add_bootstrap_option(parser, "another DHT node to join (repeatable); #ID pins its node id")
    add_swarm_option(parser)


def make_service(args: argparse.Namespace, reactor: Any) -> DHTService:
    options = DHTServiceOptions(
        host=args.host, port=args.port, data_dir=args.data_dir, bootstrap=list(args.bootstrap),
        swarm=args.swarm, announce_address=args.announce_address,
    )
    return build_dht_service(options, reactor)


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    service = make_service(args, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 2 if service.failed is not None else 0  # it could not listen
