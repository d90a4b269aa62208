#!/usr/bin/env python
"""The HTTP API against the client library: time to first token and tokens/s, 1 and N streams.

Starts a bootstrap node, one worker process per ``--spans`` entry and
``meshnode serve`` over them, then measures, for each concurrency in
``--concurrency`` (default 1 and 16):

- ``api``: streamed text completions through ``meshnode serve`` with the
  ``openai`` package (one thread per stream on this side only);
- ``library``: the same prompts through ``MeshClient.generate`` in this
  process, the engine ``meshnode generate`` runs (all streams on one client).

and, once, ``meshnode generate --json`` itself (a fresh process: its
prefill_s and decode_tok_s). Greedy, ``--new-tokens`` tokens a stream (fewer
when EOS comes first). Per run: median time to first token (request sent ->
first text piece), median per-stream decode rate (tokens after the first /
time from first to last), and aggregate tokens/s (all tokens / wall time);
each figure is the median over ``--rounds`` runs.

    scripts/bench_api.py                                  # SmolLM2 over 0:10, 10:20, 20:30
    scripts/bench_api.py --model /path/to/ckpt --spans 0:6 --concurrency 1,16 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROMPTS = ("Once upon a time", "The capital of France is", "Here is a list of fruits:",
           "In a distant galaxy", "The best way to learn", "My favourite book is",
           "Water boils at", "The history of Rome")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--spans", default="0:10,10:20,20:30", help="one worker per span")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated stream counts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="runs per setting (medians)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser.parse_args(argv)


def summary(kind: str, streams: int, runs: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    rates = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in runs
             if r["tokens"] > 1 and r["last"] > r["first"]]
    return {
        "kind": kind, "streams": streams, "tokens": tokens,
        "ttft_s": statistics.median(r["first"] - r["sent"] for r in runs),
        "stream_tok_s": statistics.median(rates) if rates else 0.0,
        "aggregate_tok_s": tokens / wall,
    }


def median_of(summaries: list[dict]) -> dict:
    """Each figure's median over rounds."""
    out = dict(summaries[0])
    for key in ("tokens", "ttft_s", "stream_tok_s", "aggregate_tok_s"):
        out[key] = statistics.median(s[key] for s in summaries)
    return out


def api_stream(client, model: str, prompt: str, new_tokens: int) -> dict:
    run = {"sent": time.perf_counter(), "first": None, "last": None, "tokens": 0}
    stream = client.completions.create(model=model, prompt=prompt, temperature=0,
                                       max_tokens=new_tokens, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            run["first"] = run["first"] or now
            run["last"] = now
        if chunk.usage is not None:
            run["tokens"] = chunk.usage.completion_tokens
    return run


def measure_api(client, model: str, streams: int, new_tokens: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    began = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda p: api_stream(client, model, p, new_tokens), prompts))
    return summary("api", streams, runs, time.perf_counter() - began)


def measure_library(client, streams: int, new_tokens: int) -> dict:
    from twisted.internet.defer import DeferredList

    from meshnode.client.api import call
    from meshnode.client.generate import GenerationOptions

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    runs = [{"sent": 0.0, "first": None, "last": None, "tokens": 0} for _ in prompts]
    lock = threading.Lock()

    def piece(run: dict):
        def on_text(_: str) -> None:
            with lock:
                now = time.perf_counter()
                run["first"] = run["first"] or now
                run["last"] = now
        return on_text

    def start_all():
        ds = []
        for run, prompt in zip(runs, prompts, strict=True):
            run["sent"] = time.perf_counter()
            d = client.generate(prompt, GenerationOptions(max_new_tokens=new_tokens), piece(run))
            d.addCallback(lambda result, run=run: run.update(tokens=len(result.token_ids)))
            ds.append(d)
        return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)

    began = time.perf_counter()
    call(start_all)
    return summary("library", streams, runs, time.perf_counter() - began)


def measure_command(join: str, model: str, new_tokens: int) -> dict:
    command = [sys.executable, "-m", "meshnode", "generate", "--bootstrap", join, "--model",
               model, "--prompt", PROMPTS[0], "--max-new-tokens", str(new_tokens), "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"kind": "meshnode generate", "streams": 1, "tokens": len(result["token_ids"]),
            "ttft_s": result["prefill_s"], "stream_tok_s": result["decode_tok_s"],
            "aggregate_tok_s": None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import openai

    from meshnode.client.api import background_client
    from meshnode.testing.processes import LocalMesh
    from tests.serve.serve_helpers import ServeProcess

    root = Path(tempfile.mkdtemp(prefix="meshnode-bench-api-"))
    results = []
    with LocalMesh(args.model, root=root) as mesh:
        mesh.start_bootstrap()
        mesh.start_workers(args.spans.split(","))
        join = str(mesh.join_address)
        server = ServeProcess(root / "serve", ["--bootstrap", join, "--model", args.model,
                                               "--model-name", "bench"])
        try:
            url = server.wait_ready()
            client = background_client([join], args.model)
            api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
            # warm both paths (the head's compiled shapes, connections, the SDK's set-up)
            for _ in range(2):
                measure_api(api, "bench", 1, 4)
                measure_library(client, 1, 4)
            for streams in (int(c) for c in args.concurrency.split(",")):
                rounds = [(measure_api(api, "bench", streams, args.new_tokens),
                           measure_library(client, streams, args.new_tokens))
                          for _ in range(args.rounds)]
                results.append(median_of([r[0] for r in rounds]))
                results.append(median_of([r[1] for r in rounds]))
            results.append(measure_command(join, args.model, args.new_tokens))
        finally:
            server.stop()
    if args.json:
        print(json.dumps({"model": args.model, "spans": args.spans, "results": results}))
    else:
        print(f"{'kind':<18} {'streams':>7} {'tokens':>6} {'TTFT s':>7} {'tok/s/stream':>12} "
              f"{'tok/s total':>11}")
        for r in results:
            total = "-" if r["aggregate_tok_s"] is None else f"{r['aggregate_tok_s']:.1f}"
            print(f"{r['kind']:<18} {r['streams']:>7} {r['tokens']:>6} {r['ttft_s']:>7.3f} "
                  f"{r['stream_tok_s']:>12.1f} {total:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
