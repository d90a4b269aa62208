"""``twistd meshnode``: options and ``makeService``, nothing else.

    twistd --pidfile=w1.pid --logfile=w1.log meshnode worker --bootstrap 127.0.0.1:7000#<id> \
        --blocks 0:10 --data-dir w1
    twistd -n --pidfile= meshnode bootstrap --port 7000
    twistd -n --pidfile= meshnode serve --bootstrap 127.0.0.1:7000#<id> --port 8000

Each subcommand's flags are the ones of ``meshnode <subcommand>`` (defined once,
in ``meshnode/commands/<name>.py``); twistd passes them through untouched.
``makeService`` only builds the service: without ``-n`` twistd forks after it,
so nothing may start a thread (JAX, thread pools) before ``startService``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import ClassVar

from twisted.application.service import IService
from twisted.python import usage

#: twistd subcommands -> the meshnode command module that defines their flags
SERVICES = {"worker": "worker", "bootstrap": "bootstrap", "serve": "serve"}


class _PassThrough(usage.Options):
    """Hands the raw arguments to the command's argparse parser."""

    command = ""

    def parseOptions(self, options: list[str] | None = None) -> None:
        module = importlib.import_module(f"meshnode.commands.{self.command}")
        parser = argparse.ArgumentParser(prog=f"twistd meshnode {self.command}")
        module.add_arguments(parser)
        try:
            self["args"] = parser.parse_args(options or [])
        except SystemExit as exc:
            if exc.code:
                raise usage.UsageError(f"bad arguments for {self.command}") from exc
            raise


class WorkerOptions(_PassThrough):
    command = "worker"


class BootstrapOptions(_PassThrough):
    command = "bootstrap"


class ServeOptions(_PassThrough):
    command = "serve"


class Options(usage.Options):
    subCommands: ClassVar[list] = [
        ["worker", None, WorkerOptions, "serve a span of transformer blocks"],
        ["bootstrap", None, BootstrapOptions, "run a DHT node that others join"],
        ["serve", None, ServeOptions, "serve the OpenAI-compatible HTTP API and monitor"],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a subcommand: worker, bootstrap or serve")


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    module = importlib.import_module(f"meshnode.commands.{SERVICES[options.subCommand]}")
    return module.make_service(options.subOptions["args"], reactor)
