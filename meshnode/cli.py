"""The ``meshnode`` command: parses the subcommand and hands off.

Each subcommand lives in ``meshnode/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. This module only dispatches.

Exit status: the command's own; 2 for usage and connection errors (any
``MeshError``, as argparse does for bad flags); 130 on Ctrl-C; 1 for a bug
(with its traceback). Run as the program (no ``argv``), the process ends with
``os._exit`` once stdout and stderr are flushed: the client's reactor and
compute threads may still be inside JAX or XLA, and letting the interpreter
tear them down at exit aborts the process (SIGABRT, "FATAL: exception not
rethrown") after the right message was printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from meshnode.errors import MeshError

#: subcommand name -> (module under meshnode.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate text, locally (--local) or through the mesh"),
    "bootstrap": ("bootstrap", "run a DHT node that others join"),
    "worker": ("worker", "serve a span of transformer blocks"),
    "status": ("status", "show which workers serve which blocks"),
    "demo": ("demo", "start a local mesh and answer a prompt through it"),
    "bench": ("bench", "measure local and mesh decode speed"),
    "swarm": ("swarm", "create a private swarm, admit or revoke its members"),
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
    """Run one command; returns its exit status (ends the process when ``argv`` is None)."""
    if argv is not None:
        return _dispatch(argv)
    try:
        code = _dispatch(None)
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    _exit_now(code)
    return code  # not reached


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MeshError as exc:
        print(f"meshnode {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - a bug: its traceback, and a status of its own
        traceback.print_exc()
        return 1


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
