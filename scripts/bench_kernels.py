#!/usr/bin/env python
"""Batched matmul kernels on SmolLM2's real weights: B rows in one call against B calls.

    .venv/bin/python scripts/bench_kernels.py [--model smollm2|F.gguf] [--layer 0]
                                              [--rows 1,2,4,8,16,32,64] [--seconds 0.3]
                                              [--json]

For each weight of one block (fused q/k/v, o, fused gate/up, down) and the
client head (SmolLM2's tied embedding, 49,152 x 576), kept in its GGUF blocks,
and for the same block's weights loaded as float32:

- ``fused``: ms per call of ``linear`` over B rows, the native batch-invariant
  kernel (``meshnode/native/qmatmul.cc``), which decodes each block once for a
  tile of rows;
- ``B x 1``: B single-row calls, as B sessions cost without batching;
- ``dequant``: the prefill path (dequantize by the kernel, then XLA's matmul),
  to show where the crossover lies (``quant.FUSED_MAX_ROWS``);
- for the same weights (and the head) in float32, the native dense kernel
  against XLA's ``x @ w``.

Each figure is the median of 5 timings of as many calls as fit in
``--seconds``; the machine's load makes them indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from meshnode import native
from meshnode.model import quant
from meshnode.model.source import open_model, smollm2_path


def ms_per_call(fn, x, seconds: float) -> float:
    """Median ms of one ``fn(x)`` call (compiled first)."""
    jax.block_until_ready(fn(x))
    began, calls = time.perf_counter(), 0
    while time.perf_counter() - began < seconds / 5 or calls < 3:
        jax.block_until_ready(fn(x))
        calls += 1
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn(x))
        timings.append((time.perf_counter() - began) / calls * 1e3)
    return statistics.median(timings)


def bench_quantized(name: str, weight, rows: list[int], seconds: float) -> list[dict]:
    fused = jax.jit(lambda x: quant.fused_matmul(x, weight))
    dequant = jax.jit(lambda x: quant.dequantized_matmul(x, weight))
    width = weight.shape[-1]
    x = np.random.default_rng(0).standard_normal((max(rows), width)).astype(np.float32)
    single = ms_per_call(fused, jnp.asarray(x[:1]), seconds)
    report = []
    for b in rows:
        xb = jnp.asarray(x[:b])
        report.append({
            "weight": name,
            "form": f"{weight.bits}-bit/{weight.group}",
            "rows": b,
            "fused_ms": ms_per_call(fused, xb, seconds),
            "singles_ms": b * single,
            "dequant_ms": ms_per_call(dequant, xb, seconds),
        })
    return report


def bench_dense(name: str, weight: np.ndarray, rows: list[int], seconds: float) -> list[dict]:
    w = jnp.asarray(np.ascontiguousarray(weight), dtype=jnp.float32)
    dense = jax.jit(lambda x: quant.dense_matmul(x, w))
    xla = jax.jit(lambda x: x @ w)
    x = np.random.default_rng(0).standard_normal((max(rows), w.shape[0])).astype(np.float32)
    single = ms_per_call(dense, jnp.asarray(x[:1]), seconds)
    return [
        {
            "weight": name,
            "form": "float32",
            "rows": b,
            "fused_ms": ms_per_call(dense, jnp.asarray(x[:b]), seconds),
            "singles_ms": b * single,
            "xla_ms": ms_per_call(xla, jnp.asarray(x[:b]), seconds),
        }
        for b in rows
    ]


def print_table(report: list[dict]) -> None:
    print(f"{'weight':<11}{'form':<11}{'B':>4}{'fused ms':>10}{'B x 1 ms':>10}{'gain':>7}"
          f"{'other ms':>10}  other")
    for r in report:
        other, label = (r["dequant_ms"], "dequant+XLA") if "dequant_ms" in r else (
            r["xla_ms"], "XLA x @ w")
        print(f"{r['weight']:<11}{r['form']:<11}{r['rows']:>4}{r['fused_ms']:>10.3f}"
              f"{r['singles_ms']:>10.3f}{r['singles_ms'] / r['fused_ms']:>6.1f}x"
              f"{other:>10.3f}  {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a .gguf file or 'smollm2'")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=0.3, help="per figure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not native.load():
        print(f"native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    rows = [int(r) for r in args.rows.split(",")]
    source = open_model(smollm2_path() if args.model == "smollm2" else Path(args.model))
    span = args.layer, args.layer + 1
    kept = source.load_span_params(*span, quantized=True).layers[0]
    floats = source.load_span_params(*span, quantized=False).layers[0]
    head = source.load_client_params(quantized=True)
    names = ("wqkv", "wo", "w_gate_up", "w_down")
    report = []
    for name in names:
        if quant.is_quantized(kept[name]):
            report += bench_quantized(name, kept[name], rows, args.seconds)
    lm_head = head.lm_head if head.lm_head is not None else head.embed
    if quant.is_quantized(lm_head):
        report += bench_quantized("head", lm_head, rows, args.seconds)
    for name in names:
        report += bench_dense(name, np.asarray(floats[name]), rows, args.seconds)
    float_head = source.load_client_params(quantized=False)
    if float_head.lm_head is not None:
        report += bench_dense("head", np.asarray(float_head.lm_head), rows, args.seconds)
    else:  # tied: ClientHead keeps the embedding transposed, [H, V], for the dense kernel
        report += bench_dense("head", np.asarray(float_head.embed).T, rows, args.seconds)
    if args.json:
        print(json.dumps({"model": source.name, "cpus": os.cpu_count(), "rows": report}))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
