"""ms/token through a mesh whose links are long, against the forwarding and client-driven bounds.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python scripts/bench_wan.py \\
        [--delays 0,5,20,50] [--tokens 32] [--repeats 2] [--forwarding | --no-forwarding] [--json]

Starts a bootstrap node and 3 workers (SmolLM2, spans 0:10, 10:20, 20:30), each
behind its own relay (``meshnode.testing.relay``) that holds every byte D ms
each way, and announced with ``--announce-address`` of that relay: every link
a step crosses (client -> worker, worker -> worker) costs D one way. Client and
workers run on loopback. One mesh serves every delay: the relays change theirs
between measurements.

Before the mesh starts, the same prompt is generated locally in this process:
its decode time per token is the local step time ``L``. For each delay the
mesh decodes the prompt once to warm up, then ``--repeats`` times; the median
decode ms/token (after the first token) is printed against

- the forwarding bound ``4*D + L``: client -> A -> B -> C -> client, four
  crossings a token;
- the client-driven bound ``6*D + L``: client -> A -> client -> B -> client ->
  C -> client, six.

Both modes run when the client has a ``forwarding`` option (``MeshClient(...,
forwarding=...)``); without it (a tree from before forwarding) only the
client-driven mode runs, and the output says so. ``--forwarding`` or
``--no-forwarding`` runs one mode only. Greedy tokens are compared with the
local ones. Figures are noisy on a loaded machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import statistics
import sys
from typing import Any

MODEL = "smollm2"
SPANS = ("0:10", "10:20", "20:30")
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
#: crossings of a relay a token makes, per mode
CROSSINGS = {"forwarding": 4, "client-driven": 6}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,5,20,50", help="one-way delays D in ms")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs per point")
    parser.add_argument("--model", default=MODEL)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--forwarding", dest="mode", action="store_const", const="forwarding")
    mode.add_argument("--no-forwarding", dest="mode", action="store_const",
                      const="client-driven")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    args.delays = [float(d) for d in args.delays.split(",") if d.strip()]
    return args


def forwarding_supported() -> bool:
    """Whether this tree's client can forward (``MeshClient(..., forwarding=...)``)."""
    from meshnode.client.api import MeshClient

    return "forwarding" in inspect.signature(MeshClient).parameters


def modes_to_run(requested: str | None, supported: bool) -> list[str]:
    if requested == "forwarding" and not supported:
        raise SystemExit("bench_wan: this client has no forwarding option yet")
    if requested is not None:
        return [requested]
    return ["forwarding", "client-driven"] if supported else ["client-driven"]


def measure_local(source: Any, prompt_ids: list[int], args: argparse.Namespace) -> tuple:
    """Median decode ms/token of local generation, and its tokens."""
    from meshnode.model.generate import LocalModel

    model = LocalModel.load(source)
    runs = [model.generate(prompt_ids=prompt_ids, max_new_tokens=args.tokens)
            for _ in range(args.repeats + 1)][1:]
    return median_ms(runs), list(runs[0].token_ids)


def median_ms(runs: list[Any]) -> float:
    return statistics.median(1e3 / r.decode_tok_s for r in runs)


def measure_mesh(client: Any, prompt_ids: list[int], mode: str, args: argparse.Namespace):
    from meshnode.client.api import call, options_from

    if hasattr(client, "forwarding"):
        client.forwarding = mode == "forwarding"
    options = options_from(max_new_tokens=args.tokens)
    runs = [call(client.generate_ids, prompt_ids, options) for _ in range(args.repeats + 1)]
    return median_ms(runs[1:]), list(runs[-1].token_ids), [r["span"] for r in runs[-1].route]


def run(args: argparse.Namespace) -> list[dict]:
    from meshnode.client.api import background_client, call
    from meshnode.model.compile_cache import enable_compile_cache
    from meshnode.model.source import open_model
    from meshnode.testing.processes import LocalMesh

    supported = forwarding_supported()
    modes = modes_to_run(args.mode, supported)
    if not supported:
        print("bench_wan: this client has no forwarding option yet: client-driven only",
              flush=True)
    enable_compile_cache()
    source = open_model(args.model)
    prompt_ids = source.tokenizer().encode(PROMPT)
    local_ms, local_tokens = measure_local(source, prompt_ids, args)
    print(f"local: {local_ms:.1f} ms/token ({len(prompt_ids)}-token prompt, "
          f"{args.tokens} new tokens)", flush=True)
    mesh = LocalMesh(args.model)
    rows = []
    try:
        mesh.start_bootstrap(relay_delay_ms=args.delays[0])
        mesh.start_workers(SPANS, extra=["--no-precompile"], relay_delay_ms=args.delays[0])
        client = background_client([mesh.join_address], args.model)
        call(client.wait_for_route, 60.0)
        for delay in args.delays:
            for node in mesh.nodes:
                node.relay.set_delay(delay)
            for mode in modes:
                ms, tokens, route = measure_mesh(client, prompt_ids, mode, args)
                rows.append(row(delay, mode, ms, local_ms, route, tokens == local_tokens))
                print_row(rows[-1])
    finally:
        mesh.stop()
        shutil.rmtree(mesh.root, ignore_errors=True)
    return rows


def row(delay: float, mode: str, ms: float, local_ms: float, route: list, same: bool) -> dict:
    bounds = {name: crossings * delay + local_ms for name, crossings in CROSSINGS.items()}
    return {
        "delay_ms": delay, "mode": mode, "ms_per_token": ms, "local_ms": local_ms,
        "forwarding_bound_ms": bounds["forwarding"],
        "client_driven_bound_ms": bounds["client-driven"],
        "over_own_bound": ms / bounds[mode], "route": route, "same_tokens": same,
    }


def print_row(r: dict) -> None:
    print(f"D={r['delay_ms']:5.1f} ms  {r['mode']:13s}  {r['ms_per_token']:7.1f} ms/token   "
          f"forwarding bound {r['forwarding_bound_ms']:6.1f}   client-driven bound "
          f"{r['client_driven_bound_ms']:6.1f}   x{r['over_own_bound']:.2f} of its bound   "
          f"same tokens: {r['same_tokens']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
