"""Tiny random checkpoints written by transformers, and the engine run over them.

Each case is a transformers config small enough to build in a second; weights
are re-drawn at a larger scale than transformers' init so logits spread and
greedy choices are not near-ties.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=True,
)

#: case name -> (transformers config class name, overrides)
CASES = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_head_dim": ("LlamaConfig", dict(head_dim=32)),
    "mistral_window": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
}


def build_reference(case: str, seed: int = 0):
    """A random transformers model (float32, eval mode) for one case."""
    import torch
    import transformers

    class_name, overrides = CASES[case]
    config = getattr(transformers, class_name)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / np.sqrt(param.shape[-1]))
    return model.eval()


def write_checkpoint(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """float32 logits [T, V] of every position of one sequence."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def reference_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
