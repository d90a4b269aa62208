"""``run_generate(args)``: the mesh branch of ``meshnode generate`` (no ``--local``).

Same options and output as local generation (``meshnode/commands/generate.py``
defines them): text streams to stdout, a summary line to stderr; ``--json``
prints one object at the end with ``route`` (worker ids and spans) added.
"""

from __future__ import annotations

import argparse
import json
import sys

from meshnode.client.api import generate, generate_ids
from meshnode.errors import BadAddress, ClientError
from meshnode.identity import PeerAddress


def run_generate(args: argparse.Namespace) -> int:
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
        "swarm": getattr(args, "swarm", None),
        "data_dir": getattr(args, "data_dir", None),
        "verify_rate": getattr(args, "verify_rate", 0.0),
    }
    on_text = None if args.json or args.prompt is None else _write
    if args.prompt_ids is not None:
        result = generate_ids(args.prompt_ids, bootstrap, args.model, **options)
    else:
        result = generate(args.prompt, bootstrap, args.model, on_text=on_text, **options)
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        if on_text is None:
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


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
