"""``meshnode demo``: a whole mesh on this machine, answering one chat prompt through it.

Starts a bootstrap node and three workers (a third of the blocks each) as
separate ``twistd`` processes on 127.0.0.1 (ephemeral ports, a temporary folder
per node with its data dir, pidfile and logfile), waits until the DHT shows
every block covered, generates the answer through them (streamed, with the
route and tokens/s, after a silent warm-up pass over the same prompt so that
compilation is not counted), then stops every process: SIGTERM, then SIGKILL after a
bound; also on Ctrl-C, SIGTERM or any error.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import signal
import sys
import time
from typing import Any

from meshnode.commands.options import DEFAULT_MODEL

DEFAULT_PROMPT = "What is the capital of France?"
#: a worker's start-up phase line in its log
PHASE_LINE = re.compile(r"meshnode worker: ([a-zA-Z :0-9]+?): ([0-9.]+) s$")
#: seconds to wait for the DHT to show every block covered
COVERAGE_TIMEOUT = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"chat prompt (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="answer at once, compilation included in the figures",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the nodes' folders (logs) instead of deleting them",
    )


def split_spans(num_layers: int, workers: int) -> list[str]:
    """``workers`` contiguous spans covering ``[0, num_layers)``, as even as possible."""
    if not 0 < workers <= num_layers:
        raise ValueError(f"cannot split {num_layers} blocks over {workers} workers")
    bounds = [round(i * num_layers / workers) for i in range(workers + 1)]
    return [f"{a}:{b}" for a, b in itertools.pairwise(bounds)]


def run(args: argparse.Namespace) -> int:
    from meshnode.model.compile_cache import enable_compile_cache
    from meshnode.testing.processes import LocalMesh

    enable_compile_cache()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    mesh = LocalMesh(args.model)
    try:
        _start(mesh, args)
        return _answer(mesh, args)
    finally:
        print("stopping the mesh...", file=sys.stderr, flush=True)
        mesh.stop()
        signal.signal(signal.SIGTERM, previous)
        if args.keep_logs:
            print(f"logs kept in {mesh.root}", file=sys.stderr)
        else:
            shutil.rmtree(mesh.root, ignore_errors=True)


def _start(mesh: Any, args: argparse.Namespace) -> None:
    from meshnode.model.source import open_model

    began = time.monotonic()
    spans = split_spans(open_model(args.model).config.num_layers, args.workers)
    bootstrap = mesh.start_bootstrap()
    _say(f"bootstrap node {bootstrap.address}")
    nodes = mesh.start_workers(spans)
    for span, node in zip(spans, nodes):
        _say(f"worker blocks {span}: {node.address} (pid {node.pid})")
        phases = _worker_phases(node)
        if phases:
            _say(f"  start-up: {phases}")
    _say(f"{len(nodes)} workers up in {time.monotonic() - began:.1f} s")


def _answer(mesh: Any, args: argparse.Namespace) -> int:
    from meshnode.client.api import background_client, call, generate

    bootstrap = [mesh.join_address]
    began = time.monotonic()
    client = background_client(bootstrap, args.model)
    _say(f"client: joined the DHT and loaded the model's head in {time.monotonic() - began:.1f} s")
    route = call(client.wait_for_route, COVERAGE_TIMEOUT)
    _say("every block covered; route: " + _route_text(route.describe()))
    # a base model without a chat template (Gemma 3 270M) continues the prompt as text
    options = {"chat": _has_chat_template(args.model), "max_new_tokens": args.max_new_tokens}
    if not args.no_warmup:
        # Each new shape compiles once (seconds on a small CPU, then cached on disk):
        # a first pass over the same prompt makes the figures below the steady ones.
        began = time.monotonic()
        generate(args.prompt, bootstrap, args.model, **options)
        _say(f"warm-up pass (compiles this prompt's shapes): {time.monotonic() - began:.1f} s")
    print(f"\n> {args.prompt}\n", flush=True)
    result = generate(args.prompt, bootstrap, args.model, on_text=_write, **options)
    print("\n", flush=True)
    _say(
        f"{len(result.token_ids)} tokens, prefill {result.prefill_s:.2f} s, "
        f"decode {result.decode_tok_s:.1f} tok/s, route {_route_text(result.route)}"
    )
    return 0


def _has_chat_template(model: str) -> bool:
    from meshnode.model.source import open_model

    return open_model(model).tokenizer().chat_template is not None


def _worker_phases(node: Any) -> str:
    """A worker's start-up phase lines (``meshnode worker: <phase>: <t> s``), on one line."""
    found = []
    for path in (node.log_path, node.folder / "stdout.log"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            match = PHASE_LINE.search(line)
            if match and match.group(1) not in dict(found):
                found.append((match.group(1), match.group(2)))
    return ", ".join(f"{name} {seconds} s" for name, seconds in found)


def _route_text(route: Any) -> str:
    return " -> ".join(f"{hop['worker'][:12]}[{hop['span'][0]}:{hop['span'][1]}]" for hop in route)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
