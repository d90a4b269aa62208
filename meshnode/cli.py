"""The ``meshnode`` command: parses the subcommand and hands off.

Each subcommand lives in ``meshnode/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. This module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from meshnode.errors import MeshError

#: subcommand name -> (module under meshnode.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate text, locally (--local) or through the mesh"),
    "bootstrap": ("bootstrap", "run a DHT node that others join"),
    "worker": ("worker", "serve a span of transformer blocks"),
    "status": ("status", "show which workers serve which blocks"),
    "demo": ("demo", "start a local mesh and answer a prompt through it"),
    "bench": ("bench", "measure local and mesh decode speed"),
    "serve": ("serve", "serve an OpenAI-compatible HTTP API, a swarm monitor and metrics"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"meshnode.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"meshnode.commands.{module_name}":
                raise
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MeshError as exc:
        print(f"meshnode {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
