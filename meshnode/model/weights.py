"""From named checkpoint tensors to the engine's parameter trees.

Both weight formats are read through a ``TensorReader``: a lookup by Hugging
Face tensor name (``model.layers.3.self_attn.q_proj.weight``) that returns a
numpy array in HF layout ([out, in] for projections). This module renames,
checks each tensor's shape against the config, transposes to [in, out], fuses
q/k/v and gate/up and casts to the storage dtype, block by block. Only the
tensors of the requested blocks are read.

With ``quantized=True``, a reader that can hand over a projection still in its
quantization blocks (``read_quantized``: GGUF's Q4_*, Q5_*, Q6_K, Q8_0) gives a
``QuantizedMatrix`` [out, in] instead (meshnode/model/quant.py); a fused weight
whose parts differ in form (Q4_K q/k and a Q6_K v) takes the widest of them,
exactly, and one with a part that has no block form (Q3_K) is float32 [in, out]
in that layer.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from meshnode.errors import MissingWeights, ModelError, ShapeMismatch
from meshnode.model.config import ModelConfig
from meshnode.model.dtypes import storage_dtype
from meshnode.model.head import ClientParams
from meshnode.model.quant import QuantizedMatrix, concat_rows, is_quantized
from meshnode.model.span import SpanParams


class TensorReader(Protocol):
    """Named tensors of one checkpoint, read on demand. A reader may also offer
    ``read_quantized(name) -> QuantizedMatrix | None`` (GGUFFile does)."""

    def has(self, name: str) -> bool: ...

    def read(self, name: str) -> np.ndarray: ...


#: per family: the block's norms, engine name -> Hugging Face name (under model.layers.N.)
_NORMS = {
    "llama": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "gemma3": {
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    },
}


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


def _fetch(reader: TensorReader, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not reader.has(name):
        raise MissingWeights(f"checkpoint lacks tensor {name!r}")
    array = reader.read(name)
    if tuple(array.shape) != shape:
        raise ShapeMismatch(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
    return array


def _fetch_quantized(
    reader: TensorReader, name: str, shape: tuple[int, int]
) -> QuantizedMatrix | None:
    read_quantized = getattr(reader, "read_quantized", None)
    if read_quantized is None:
        return None
    if not reader.has(name):
        raise MissingWeights(f"checkpoint lacks tensor {name!r}")
    matrix = read_quantized(name)
    if matrix is not None and matrix.shape != shape:
        raise ShapeMismatch(f"tensor {name!r} has shape {matrix.shape}, expected {shape}")
    return matrix


def _projection(
    reader: TensorReader, parts: list[tuple[str, int, int]], quantized: bool
) -> np.ndarray | QuantizedMatrix:
    """Projections (name, out, in) fused along out: float32 [in, sum(out)], or a
    QuantizedMatrix [sum(out), in] when asked for and every part has a block form."""
    if quantized:
        blocks = [_fetch_quantized(reader, name, (o, i)) for name, o, i in parts]
        if all(b is not None for b in blocks):
            return concat_rows(blocks)
    return np.concatenate(
        [_fetch(reader, name, (o, i)).astype(np.float32).T for name, o, i in parts], axis=1
    )


def layer_tensors(
    config: ModelConfig, reader: TensorReader, index: int, quantized: bool = False
) -> dict[str, np.ndarray | QuantizedMatrix]:
    """One layer's parameters (see meshnode/model/layers.py), fused; float32 [in, out]
    or, with ``quantized``, QuantizedMatrix [out, in] where the reader has them."""
    c, p = config, layer_prefix(index)
    h, q, kv, f = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    attn, mlp = p + "self_attn.", p + "mlp."

    def vector(name: str, size: int) -> np.ndarray:
        return _fetch(reader, name, (size,)).astype(np.float32)

    def projection(*parts: tuple[str, int, int]) -> np.ndarray | QuantizedMatrix:
        return _projection(reader, list(parts), quantized)

    norms = _NORMS.get(c.family, _NORMS["llama"])
    params = {
        name: vector(p + hf_name + ".weight", h) for name, hf_name in norms.items()
    }  # [H] each
    fused = c.family == "phi3"  # checkpoints with qkv_proj and gate_up_proj
    qkv = (
        [(attn + "qkv_proj.weight", q + 2 * kv, h)]
        if fused
        else [
            (attn + "q_proj.weight", q, h),
            (attn + "k_proj.weight", kv, h),
            (attn + "v_proj.weight", kv, h),
        ]
    )
    params["wqkv"] = projection(*qkv)  # [H, Q + 2KV]
    params["wo"] = projection((attn + "o_proj.weight", h, q))  # [Q, H]
    if fused:
        params["w_gate_up"] = projection((mlp + "gate_up_proj.weight", 2 * f, h))  # [H, 2F]
        params["w_down"] = projection((mlp + "down_proj.weight", h, f))  # [F, H]
    elif c.num_experts:
        params.update(_expert_tensors(c, reader, index, quantized))
    else:
        params["w_gate_up"] = projection(
            (mlp + "gate_proj.weight", f, h), (mlp + "up_proj.weight", f, h)
        )  # [H, 2F]
        params["w_down"] = projection((mlp + "down_proj.weight", h, f))  # [F, H]
    if c.qk_norm:
        params["q_norm"] = vector(attn + "q_norm.weight", c.head_dim)  # [D]
        params["k_norm"] = vector(attn + "k_norm.weight", c.head_dim)  # [D]
    if c.qkv_bias:
        params["bqkv"] = np.concatenate(
            [
                vector(attn + "q_proj.bias", q),
                vector(attn + "k_proj.bias", kv),
                vector(attn + "v_proj.bias", kv),
            ]
        )  # [Q + 2KV]
    if c.o_bias:
        params["bo"] = vector(attn + "o_proj.bias", h)
    return params


def expert_name(expert: int, name: str) -> str:
    """The flat parameter name of one expert's weight: ``expert.3.w_down``."""
    return f"expert.{expert}.{name}"


def _expert_tensors(
    config: ModelConfig, reader: TensorReader, index: int, quantized: bool
) -> dict[str, Any]:
    """A mixture-of-experts layer: router [H, E] float32, and per expert its gate/up
    [H, 2F] and down [F, H] (QuantizedMatrix [out, in] with ``quantized`` where they
    can be). Checkpoints name experts as Mixtral's ``block_sparse_moe.experts.E.w1/w3/w2``
    (GGUF files map their stacked ``ffn_*_exps`` tensors onto these names)."""
    h, f = config.hidden_size, config.intermediate_size
    moe = layer_prefix(index) + "block_sparse_moe."
    router = _fetch(reader, moe + "gate.weight", (config.num_experts, h)).astype(np.float32)
    params: dict[str, Any] = {"router": np.ascontiguousarray(router.T)}  # [H, E]
    for e in range(config.num_experts):
        expert = f"{moe}experts.{e}."
        params[expert_name(e, "w_gate_up")] = _projection(
            reader, [(expert + "w1.weight", f, h), (expert + "w3.weight", f, h)], quantized
        )  # [H, 2F]
        params[expert_name(e, "w_down")] = _projection(
            reader, [(expert + "w2.weight", h, f)], quantized
        )  # [F, H]
    return params


def span_params(
    config: ModelConfig,
    reader: TensorReader,
    start: int,
    end: int,
    dtype: Any,
    quantized: bool = False,
) -> SpanParams:
    """Blocks [start, end), one parameter dict per block: float weights in the storage
    dtype and, with ``quantized``, QuantizedMatrix weights where the reader has them
    (blocks may differ: a Q4_K_M file mixes Q4_K and Q6_K layers)."""
    if not 0 <= start < end <= config.num_layers:
        raise ModelError(f"span [{start}, {end}) is outside the model's {config.num_layers} blocks")
    target = storage_dtype(dtype)
    layers = tuple(
        {
            name: value if is_quantized(value) else value.astype(target)
            for name, value in layer_tensors(config, reader, index, quantized).items()
        }
        for index in range(start, end)
    )
    return SpanParams(start=start, end=end, layers=layers)


def client_params(
    config: ModelConfig, reader: TensorReader, dtype: Any, quantized: bool = False
) -> ClientParams:
    """Embedding, final norm and (untied models) LM head, in the storage dtype; with
    ``quantized``, the embedding and head stay QuantizedMatrix [V, H] where they can."""
    target = storage_dtype(dtype)
    h, v = config.hidden_size, config.vocab_size
    embed: Any = (
        _fetch_quantized(reader, "model.embed_tokens.weight", (v, h)) if quantized else None
    )
    if embed is None:
        embed = _fetch(reader, "model.embed_tokens.weight", (v, h)).astype(target)  # [V, H]
    norm = _fetch(reader, "model.norm.weight", (h,)).astype(target)  # [H]
    lm_head: Any = None
    if not config.tie_word_embeddings:
        lm_head = _fetch_quantized(reader, "lm_head.weight", (v, h)) if quantized else None
        if lm_head is None:  # else a QuantizedMatrix [V, H]
            lm_head = np.ascontiguousarray(
                _fetch(reader, "lm_head.weight", (v, h)).astype(target).T
            )  # [H, V]
    return ClientParams(embed=embed, final_norm=norm, lm_head=lm_head)
