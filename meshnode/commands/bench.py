"""``meshnode bench``: local against mesh generation speed, same model, same run.

    meshnode bench [--model smollm2] [--workers 3] [--new-tokens 32] [--repeats 3] [--json]
                   [--no-forwarding]

Starts a local mesh (bootstrap node + ``--workers`` worker processes, as the
demo does), waits for their background precompiling, then, while they sit
idle, measures local generation in
this process; then the same prompt through the mesh. Each side runs once to
warm up (compilation) and ``--repeats`` times measured; the median run is
reported: decode tokens/s (after the first token) and prefill seconds (prompt
in to first token out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from typing import Any

from meshnode.commands.demo import split_spans
from meshnode.commands.options import DEFAULT_MODEL

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default: 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per side")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-forwarding", action="store_true",
                        help="the client calls each worker in turn (the mesh before issue 11)")


def run(args: argparse.Namespace) -> int:
    from meshnode.model.compile_cache import enable_compile_cache
    from meshnode.model.source import open_model
    from meshnode.testing.processes import LocalMesh

    enable_compile_cache()
    source = open_model(args.model)
    prompt_ids = _prompt_ids(source)
    mesh = LocalMesh(args.model)
    try:
        mesh.start_bootstrap()
        mesh.start_workers(split_spans(source.config.num_layers, args.workers))
        # the workers compile their step programs in the background: wait, or they compete
        # with the local measurement for the cores
        if not mesh.wait_precompiled():
            print("meshnode bench: workers still precompiling, measuring anyway",
                  file=sys.stderr)
        local = _measure_local(source, prompt_ids, args)
        mesh_runs, route = _measure_mesh(mesh, args.model, prompt_ids, args)
    finally:
        mesh.stop()
        shutil.rmtree(mesh.root, ignore_errors=True)
    report = _report(source, args, prompt_ids, local, mesh_runs, route)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _prompt_ids(source: Any) -> list[int]:
    from meshnode.errors import ModelError

    try:
        return source.tokenizer().encode(PROMPT)
    except ModelError:  # no tokenizer: fixed ids
        return [(7 * i + 3) % source.config.vocab_size for i in range(16)]


def _measure_local(source: Any, prompt_ids: list[int], args: argparse.Namespace) -> list[Any]:
    from meshnode.model.generate import LocalModel

    model = LocalModel.load(source)
    runs = []
    for _ in range(args.repeats + 1):
        runs.append(model.generate(prompt_ids=prompt_ids, max_new_tokens=args.new_tokens))
    return runs[1:]


def _measure_mesh(
    mesh: Any, model: str, prompt_ids: list[int], args: argparse.Namespace
) -> tuple[list[Any], list[dict]]:
    from meshnode.client.api import background_client, call, options_from

    client = background_client([mesh.join_address], model)
    client.forwarding = not args.no_forwarding
    call(client.wait_for_route, 60.0)
    options = options_from(max_new_tokens=args.new_tokens)
    runs = [call(client.generate_ids, prompt_ids, options) for _ in range(args.repeats + 1)]
    return runs[1:], list(runs[-1].route)


def _median_run(runs: list[Any]) -> Any:
    ordered = sorted(runs, key=lambda r: r.decode_tok_s)
    return ordered[len(ordered) // 2]


def _report(
    source: Any,
    args: argparse.Namespace,
    prompt_ids: list[int],
    local: list[Any],
    mesh_runs: list[Any],
    route: list[dict],
) -> dict[str, Any]:
    import jax

    best_local, best_mesh = _median_run(local), _median_run(mesh_runs)
    return {
        "model": source.name,
        "workers": args.workers,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(best_mesh.token_ids),
        "local": {
            "decode_tok_s": best_local.decode_tok_s,
            "prefill_s": best_local.prefill_s,
            "runs": [r.decode_tok_s for r in local],
        },
        "mesh": {
            "decode_tok_s": best_mesh.decode_tok_s,
            "prefill_s": best_mesh.prefill_s,
            "runs": [r.decode_tok_s for r in mesh_runs],
            "route": route,
        },
        "decode_ratio": best_mesh.decode_tok_s / best_local.decode_tok_s
        if best_local.decode_tok_s
        else 0.0,
        "same_tokens": list(best_local.token_ids) == list(best_mesh.token_ids),
        "device": f"{jax.default_backend()} ({platform.machine()}, {_cores()} cores)",
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _print(report: dict[str, Any]) -> None:
    local, mesh = report["local"], report["mesh"]
    print(
        f"{report['model']}: {report['prompt_tokens']}-token prompt, "
        f"{report['new_tokens']} new tokens, {report['workers']} workers, {report['device']}"
    )
    print(
        f"  local: decode {local['decode_tok_s']:7.1f} tok/s   prefill {local['prefill_s']:.3f} s"
    )
    print(f"  mesh:  decode {mesh['decode_tok_s']:7.1f} tok/s   prefill {mesh['prefill_s']:.3f} s")
    print(
        f"  mesh/local decode: {report['decode_ratio']:.2f}   same tokens: {report['same_tokens']}",
        file=sys.stdout,
    )
