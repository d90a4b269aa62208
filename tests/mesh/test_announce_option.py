"""``--announce-address`` is one flag of ``meshnode worker`` and ``meshnode bootstrap``, the
same under ``twistd``: parsed into the options their services take."""

from __future__ import annotations

import argparse

import pytest
from twisted.python import usage

from meshnode.commands import bootstrap, worker
from meshnode.identity import PeerAddress
from meshnode.tap import Options


def parse(command, argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_worker_and_bootstrap_take_the_announced_address(tmp_path):
    """When --announce-address HOST:PORT is given, then the worker's and the DHT node's options
    carry it (without a node id) while they still listen on --host/--port."""
    args = parse(worker, ["--port", "7100", "--announce-address", "203.0.113.7:9100",
                          "--data-dir", str(tmp_path)])
    options = worker.options_from_args(args)
    assert (options.port, options.announce_address) == (7100, PeerAddress("203.0.113.7", 9100))
    service = bootstrap.make_service(
        parse(bootstrap, ["--announce-address", "seed.example.org:7000"]), reactor=None
    )
    assert service.options.announce_address == PeerAddress("seed.example.org", 7000)
    assert worker.options_from_args(parse(worker, [])).announce_address is None


def test_the_twistd_plugin_passes_it_through():
    """When twistd meshnode worker gets --announce-address, then the parsed arguments hold it;
    one with a node id is a usage error (the node adds its own)."""
    options = Options()
    options.parseOptions(["worker", "--announce-address", "[2001:db8::1]:7100"])
    assert options.subOptions["args"].announce_address == PeerAddress("2001:db8::1", 7100)
    with pytest.raises((usage.UsageError, SystemExit)):
        Options().parseOptions(["bootstrap", "--announce-address", "h:1#" + "ab" * 32])
