#!/usr/bin/env python
"""Local speed: meshnode's engine against transformers eager, same model, same run.

    .venv/bin/python scripts/bench_local.py [--model smollm2|gemma3-270m|F.gguf]
                                            [--prompt-tokens 128] [--decode-tokens 64]
                                            [--repeats 3] [--no-transformers] [--json]

Both compute in float32 on this machine's CPU over the same weight values:
transformers loads the GGUF with ``gguf_file=`` and dequantizes it to float32
tensors; meshnode keeps Q4_*/Q5_*/Q6_K/Q8_0 matrices in their blocks and
multiplies by them with its native kernel (docs/model.md). A second meshnode
row dequantizes the weights to float32 at load (``quantized=False``), as
transformers does. Prefill = a ``prompt-tokens`` prompt in, logits of its last
position out. Decode = greedy steps through the KV cache, tokens per second.
Each figure is the median of ``--repeats`` runs after one warm-up run (which
compiles every JAX shape used).
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from meshnode import native
from meshnode.model.decoding import generate_tokens
from meshnode.model.generate import LocalBlocks, LocalModel
from meshnode.model.sampling import Sampler
from meshnode.model.source import gemma3_270m_path, open_model, smollm2_path


def bench_meshnode(
    source, prompt: list[int], decode_tokens: int, repeats: int, quantized: bool | None
) -> dict:
    model = LocalModel.load(source, quantized=quantized)
    max_length = len(prompt) + decode_tokens + 1

    def prefill() -> float:
        blocks = LocalBlocks(model.runner, max_length)
        began = time.perf_counter()
        hidden = blocks(model.head.embed([prompt]), 0)
        np.asarray(model.head.logits(hidden))
        return time.perf_counter() - began

    def decode() -> float:
        blocks = LocalBlocks(model.runner, max_length)
        result = generate_tokens(
            model.head, blocks, prompt, max_new_tokens=decode_tokens + 1, sampler=Sampler()
        )
        return result.decode_tok_s

    prefill()
    decode()
    return {
        "prefill_s": statistics.median(prefill() for _ in range(repeats)),
        "decode_tok_s": statistics.median(decode() for _ in range(repeats)),
    }


def bench_transformers(gguf: Path, prompt: list[int], decode_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor([prompt])

    @torch.no_grad()
    def prefill() -> float:
        began = time.perf_counter()
        model(ids, use_cache=True).logits[:, -1].float().numpy()
        return time.perf_counter() - began

    @torch.no_grad()
    def decode() -> float:
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        began = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return decode_tokens / (time.perf_counter() - began)

    prefill()
    decode()
    return {
        "prefill_s": statistics.median(prefill() for _ in range(repeats)),
        "decode_tok_s": statistics.median(decode() for _ in range(repeats)),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="a .gguf file, 'smollm2' or 'gemma3-270m'"
    )
    parser.add_argument(
        "--no-transformers", action="store_true", help="meshnode rows only (no reference run)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    packaged = {"smollm2": smollm2_path, "gemma3-270m": gemma3_270m_path}
    gguf = packaged[args.model]() if args.model in packaged else Path(args.model)
    source = open_model(gguf)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, source.config.vocab_size, size=args.prompt_tokens).tolist()

    ours = bench_meshnode(source, prompt, args.decode_tokens, args.repeats, None)
    ours["blocks_kept"] = native.load()
    floats = bench_meshnode(source, prompt, args.decode_tokens, args.repeats, False)
    if args.no_transformers:
        theirs = {"prefill_s": float("nan"), "decode_tok_s": float("nan"), "threads": 0}
    else:
        theirs = bench_transformers(gguf, prompt, args.decode_tokens, args.repeats)
    report = {
        "model": source.name,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "meshnode": ours,
        "meshnode_float_weights": floats,
        "transformers_eager": theirs,
        "prefill_speedup": theirs["prefill_s"] / ours["prefill_s"],
        "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{source.name}: float32 CPU, {args.prompt_tokens}-token prompt, "
        f"{args.decode_tokens} decode steps, median of {args.repeats}"
    )
    print(f"{'':34}{'prefill (s)':>14}{'decode (tok/s)':>17}")
    kept = "quantized blocks" if ours["blocks_kept"] else "float32 weights"
    print(f"{'meshnode, ' + kept:34}{ours['prefill_s']:>14.4f}{ours['decode_tok_s']:>17.1f}")
    print(
        f"{'meshnode, float32 weights':34}{floats['prefill_s']:>14.4f}"
        f"{floats['decode_tok_s']:>17.1f}"
    )
    print(f"{'transformers eager':34}{theirs['prefill_s']:>14.4f}{theirs['decode_tok_s']:>17.1f}")
    print(
        f"{'ratio (meshnode first row/hf)':34}{report['prefill_speedup']:>13.2f}x"
        f"{report['decode_speedup']:>16.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
