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

BASE = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "tie_word_embeddings": True,
}

#: case name -> (transformers config class name, overrides)
CASES = {
    "llama": ("LlamaConfig", {"rope_theta": 10000.0}),
    "llama3_rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "llama_untied": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama_head_dim": ("LlamaConfig", {"head_dim": 32}),
    "mistral_window": ("MistralConfig", {"sliding_window": 8, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": False}),
    # local (window 8, rope 1e4) and global (rope 1e6) layers; a scalar that is not head_dim
    "gemma3": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "query_pre_attn_scalar": 24,
        },
    ),
    # 4 experts, 2 per position, sliding window shorter than the prompt
    "mixtral": (
        "MixtralConfig",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "tie_word_embeddings": False,
        },
    ),
    # fused qkv_proj and gate_up_proj; longrope within its original context (short factors,
    # attention factor sqrt(1 + ln 4 / ln 64) from max / original positions)
    "phi3": (
        "Phi3Config",
        {
            "max_position_embeddings": 256,
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + 0.5 * i for i in range(8)],
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
            "pad_token_id": None,
        },
    ),
    "gemma3_softcap": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "attn_logit_softcapping": 4.0,  # transformers' Gemma 3 ignores it; so must we
            "final_logit_softcapping": 6.0,
            "tie_word_embeddings": False,
        },
    ),
}


def build_reference(case: str, seed: int = 0, **changes):
    """A random transformers model (float32, eval mode) for one case (config ``changes``
    on top)."""
    import torch
    import transformers

    class_name, overrides = CASES[case]
    config = getattr(transformers, class_name)(**{**BASE, **overrides, **changes})
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


def gguf_reference(path: Path):
    """(transformers model in float32, transformers tokenizer) over the GGUF file ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


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
    return out[0, len(ids) :].tolist()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (what the loader undoes)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model, path: Path, qtype_name: str = "F32") -> dict[str, np.ndarray]:
    """Write a transformers Llama as a llama.cpp-style GGUF; 2-D weights in ``qtype_name``.

    Returns HF name -> the float32 values a loader should read back (quantization
    error included, permutation undone).
    """
    import gguf

    from meshnode.model.gguf_file import gguf_name

    config = model.config
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_local_experts", 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    expected = {}
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ".mlp.experts." in name:
            expected[name] = _write_experts(writer, name, values, qtype)
            continue
        target = gguf_name(name.replace(".mlp.gate.", ".block_sparse_moe.gate."))
        assert target is not None, name
        stored = values
        if ".attn_q." in target:
            stored = llama_cpp_permute(values, config.num_attention_heads)
        elif ".attn_k." in target:
            stored = llama_cpp_permute(values, config.num_key_value_heads)
        if values.ndim == 2 and qtype_name != "F32":
            raw = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(target, raw, raw_dtype=qtype)
            roundtrip = gguf.quants.dequantize(raw, qtype).reshape(values.shape)
            if stored is not values:
                heads = (
                    config.num_attention_heads
                    if ".attn_q." in target
                    else config.num_key_value_heads
                )
                half = values.shape[0] // heads // 2
                roundtrip = (
                    roundtrip.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(values.shape)
                )
            expected[name] = roundtrip
        else:
            writer.add_tensor(target, stored.astype(np.float32))
            expected[name] = values
    factors = llama3_rope_factors(config)
    if factors is not None:  # as llama.cpp's converter bakes Llama 3 rope scaling in
        writer.add_tensor("rope_freqs.weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _write_experts(writer, name: str, values: np.ndarray, qtype) -> np.ndarray:
    """transformers' fused experts (gate_up_proj [E, 2F, H], down_proj [E, H, F]) as
    llama.cpp's stacked ffn_gate_exps / ffn_up_exps / ffn_down_exps; returns what a loader
    reads back, in the fused layout."""
    import gguf

    layer = name.split(".")[2]
    if name.endswith("gate_up_proj"):
        half = values.shape[1] // 2
        parts = {"ffn_gate_exps": values[:, :half], "ffn_up_exps": values[:, half:]}
    else:
        parts = {"ffn_down_exps": values}
    back = []
    for target, stored in parts.items():
        stored = np.ascontiguousarray(stored)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(f"blk.{layer}.{target}.weight", stored)
            back.append(stored)
            continue
        raw = gguf.quants.quantize(stored, qtype)
        writer.add_tensor(f"blk.{layer}.{target}.weight", raw, raw_dtype=qtype)
        back.append(gguf.quants.dequantize(raw, qtype).reshape(stored.shape))
    return np.concatenate(back, axis=1)


def llama3_rope_factors(config) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for a Llama 3 rope scaling, as its converter
    computes it (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors); else None."""
    import math

    rope = config.rope_parameters
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
