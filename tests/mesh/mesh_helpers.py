"""Helpers of the mesh tests: a tiny random checkpoint, local references, Deferred timeouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LAYERS = 6
#: seconds any awaited Deferred of a mesh test may take before the test fails
DEFERRED_TIMEOUT = 120.0


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random 6-block Llama (hidden 64) written with transformers' save_pretrained."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:  # a larger scale than the default init, so greedy choices are not near-ties
                param.copy_(torch.randn_like(param) / np.sqrt(param.shape[-1]))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def with_timeout(d, reactor, seconds: float = DEFERRED_TIMEOUT):
    """Every Deferred (or coroutine) a test awaits gets a bound."""
    import inspect

    from twisted.internet.defer import Deferred

    if inspect.iscoroutine(d):
        d = Deferred.fromCoroutine(d)
    return d.addTimeout(seconds, reactor)


def prompts(count: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """``count`` different prompts of 3 to 20 ids."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    while len(out) < count:
        ids = rng.integers(0, vocab, size=int(rng.integers(3, 21))).tolist()
        if ids not in out:
            out.append(ids)
    return out
