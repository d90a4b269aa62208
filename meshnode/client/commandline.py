"""``run_generate(args)``: the mesh branch of ``meshnode generate`` (no ``--local``).

Same options and output as local generation (``meshnode/commands/generate.py``
defines them): text streams to stdout, a summary line to stderr; ``--json``
prints one object at the end with ``route`` (worker ids and spans) added.

When a span's last worker fails mid-generation, the client waits up to
``--recovery-wait`` seconds for another to take the span over; if none does,
what was generated so far is printed (``--json``: an object with
``interrupted: true``, ``token_ids``, ``text`` and ``error``), the error goes
to stderr and the exit status is 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from meshnode.client.api import background_client, call, options_from
from meshnode.errors import BadAddress, ClientError, GenerationInterrupted
from meshnode.identity import PeerAddress
from meshnode.phases import StartupPhases


def run_generate(args: argparse.Namespace, phases: StartupPhases | None = None) -> int:
    if not args.bootstrap:
        raise ClientError("mesh generation needs --bootstrap HOST:PORT[#ID] (or --local)")
    try:
        bootstrap = [PeerAddress.parse(str(a)) for a in args.bootstrap]
    except BadAddress as exc:
        raise ClientError(f"bad --bootstrap: {exc}") from exc
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "chat": args.chat,
    }
    phases = phases or StartupPhases(lambda line: None)
    with phases.phase("join the DHT and load the model's head"):
        client = background_client(
            bootstrap, args.model, swarm=getattr(args, "swarm", None),
            data_dir=getattr(args, "data_dir", None),
            verify_rate=getattr(args, "verify_rate", 0.0),
        )
    client.recovery_options = dataclasses.replace(
        client.recovery_options, route_wait=args.recovery_wait
    )
    client.forwarding = not getattr(args, "no_forwarding", False)
    on_text = None if args.json or args.prompt is None else _write
    # token ids of a model without a tokenizer stream as they come, as text would
    on_token = None if args.json or client.tokenizer is not None else _write_id
    streamed = on_text is not None or on_token is not None
    try:
        if args.prompt_ids is not None:
            result = call(
                client.generate_ids, list(args.prompt_ids), options_from(**options), on_token
            )
        else:
            result = call(client.generate, args.prompt, options_from(**options), on_text)
    except GenerationInterrupted as exc:
        _print_partial(exc, args, streamed)
        raise
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        if not streamed:
            print(result.text or " ".join(map(str, result.token_ids)))
        else:
            print()
        route = " -> ".join(
            f"{hop['worker'][:12]}[{hop['span'][0]}:{hop['span'][1]}]" for hop in result.route
        )
        print(
            f"[{len(result.token_ids)} tokens, prefill {result.prefill_s:.3f} s, "
            f"decode {result.decode_tok_s:.1f} tok/s, route {route}]",
            file=sys.stderr,
        )
    return 0


def _print_partial(exc: GenerationInterrupted, args: argparse.Namespace, streamed: bool) -> None:
    """What was generated before the failure: on stdout (streamed text already is there)."""
    if args.json:
        print(json.dumps({"token_ids": list(exc.token_ids), "text": exc.text,
                          "error": str(exc), "interrupted": True}))
    elif streamed:
        print()
    else:
        print(exc.text or " ".join(map(str, exc.token_ids)))
    print(f"[interrupted after {len(exc.token_ids)} tokens]", file=sys.stderr, flush=True)


def _write_id(token: int) -> None:
    _write(f"{token} ")


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
