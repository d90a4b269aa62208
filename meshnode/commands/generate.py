"""``meshnode generate``: generate text locally (--local) or through the mesh.

Only options and output live here: local generation is
``meshnode.model.generate.LocalModel``, mesh generation is
``meshnode.client.commandline.run_generate`` (imported only when used). Text
streams to stdout as it is produced; ``--json`` prints one object at the end
instead: token_ids (new tokens only), text, prefill_s, decode_tok_s.
"""

from __future__ import annotations

import argparse
import json
import sys

from meshnode.client.defaults import DEFAULT_VERIFY_RATE, ROUTE_WAIT
from meshnode.commands.options import (
    add_bootstrap_option,
    add_client_identity_options,
    add_model_option,
    add_verify_option,
)
from meshnode.errors import ModelError
from meshnode.phases import StartupPhases

#: start-up phases at least this long (seconds) are said on stderr
SLOW_PHASE = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", action="store_true", help="run every block in this process")
    add_model_option(parser, "checkpoint folder, .gguf file, or 'smollm2'")
    parser.add_argument("--prompt", default=None, help="the prompt text")
    parser.add_argument(
        "--prompt-ids",
        default=None,
        type=_id_list,
        help="comma-separated prompt token ids, instead of --prompt",
    )
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = no top-p filter")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_bootstrap_option(parser, "a DHT node to join (repeatable; mesh mode); #ID pins its node id")
    add_client_identity_options(parser)
    add_verify_option(parser, DEFAULT_VERIFY_RATE)
    parser.add_argument(
        "--no-forwarding",
        action="store_true",
        help="call each worker in turn (client -> A -> client -> B ...) instead of letting "
        "workers push each step to the next one (client -> A -> B -> ... -> client)",
    )
    parser.add_argument(
        "--recovery-wait",
        type=float,
        default=ROUTE_WAIT,
        metavar="S",
        help="when a span's last worker fails, wait up to S seconds for another "
        f"(default: {ROUTE_WAIT:g})",
    )


def run(args: argparse.Namespace) -> int:
    if args.prompt is None and args.prompt_ids is None:
        raise ModelError("give --prompt TEXT or --prompt-ids 1,2,3")
    phases = startup_phases()
    with phases.phase("start JAX (compile cache, native kernels)"):
        from meshnode.model.compile_cache import enable_compile_cache

        enable_compile_cache()
    if not args.local:
        from meshnode.client.commandline import run_generate

        return run_generate(args, phases)
    return _run_local(args, phases)


def startup_phases() -> StartupPhases:
    """Start-up phases of ``generate``, said on stderr when one takes a second or more."""
    return StartupPhases(_say, prefix="meshnode generate: ", quiet_below=SLOW_PHASE)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sampling_options(args: argparse.Namespace):  # -> SamplingOptions
    """The sampling flags as SamplingOptions (shared with the mesh command)."""
    from meshnode.model.sampling import SamplingOptions

    return SamplingOptions(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )


def _run_local(args: argparse.Namespace, phases: StartupPhases) -> int:
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    with phases.phase("load model"):
        model = LocalModel.load(open_model(args.model))

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = model.generate(
        args.prompt,
        prompt_ids=args.prompt_ids,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling_options(args),
        on_text=None if args.json or args.prompt_ids is not None and _no_text(model) else stream,
    )
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print()
        print(
            f"[{len(result.token_ids)} tokens, prefill {result.prefill_s:.3f} s, "
            f"decode {result.decode_tok_s:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def _no_text(model) -> bool:
    try:
        model.source.tokenizer()
    except ModelError:
        return True
    return False


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ids: {text!r}") from exc
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids
