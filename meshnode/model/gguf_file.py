"""GGUF files: config from metadata, and tensors dequantized under Hugging Face names.

``GGUFFile`` memory-maps the file (meshnode/model/gguf_reader.py); a tensor is
dequantized (``gguf.quants.dequantize``: F32, F16, BF16, Q4_0, Q4_1, Q5_*, Q8_0,
the K-quants...) only when read, so a span touches only its blocks.

llama.cpp's converter permutes the rows of q/k projections of ``llama``
architecture files from Hugging Face's half-rotation layout to interleaved
pairs; reading undoes it exactly as transformers' ``LlamaTensorProcessor`` does
(``reverse_permute``), so both layouts meet the same rotary code.

Gemma files store every norm weight plus one (llama.cpp's converter adds 1 so
that its plain RMSNorm computes Gemma's ``(1 + w)``); reading subtracts it
again, as transformers' ``Gemma2TensorProcessor`` does. GGUF does not say
which Gemma 3 layers are global: every 6th one is, as in llama.cpp and
transformers (``sliding_window_pattern`` 6), and the local layers' rope base
is 10000.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from meshnode.errors import ConfigError, MissingWeights, ModelError, UnknownArchitecture
from meshnode.model.config import ModelConfig, RopeConfig, gemma3
from meshnode.model.gguf_reader import GGUFHeader
from meshnode.model.quant import QuantizedMatrix, from_gguf

#: GGUF general.architecture -> engine family
_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
}
#: architectures whose q/k rows llama.cpp permutes
_PERMUTED = {"llama", "mistral"}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "block_sparse_moe.gate": "ffn_gate_inp",
}
#: per architecture, names that differ from the llama ones (Gemma's sandwich norms)
_ARCH_LAYER_NAMES = {
    "gemma3": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
}
#: architectures whose norm weights are stored plus one
_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}


def gguf_name(hf_name: str, architecture: str = "llama") -> str | None:
    """The GGUF tensor name of a Hugging Face one, or None if it has none."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    index, stem, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(architecture, {})}
    if stem not in names:
        return None
    return f"blk.{index}.{names[stem]}.{kind}"


#: Mixtral's per-expert weights -> llama.cpp's tensors stacking every expert of a layer
_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def expert_tensor(hf_name: str) -> tuple[str, int] | None:
    """(GGUF stacked tensor, expert index) of ``model.layers.N.block_sparse_moe.experts.E.wK
    .weight``; None for other names."""
    parts = hf_name.split(".")
    if (
        len(parts) != 8
        or parts[:2] != ["model", "layers"]
        or parts[3:5]
        != [
            "block_sparse_moe",
            "experts",
        ]
    ):
        return None
    if parts[6] not in _EXPERT_NAMES or parts[7] != "weight" or not parts[5].isdigit():
        return None
    return f"blk.{parts[2]}.{_EXPERT_NAMES[parts[6]]}.weight", int(parts[5])


def reverse_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows [heads * 2 * half] back to HF order."""
    half = weights.shape[0] // heads // 2
    w = weights.reshape(heads, half, 2, *weights.shape[1:])  # [h, D/2, 2, ...]
    return w.swapaxes(2, 1).reshape(weights.shape)


class GGUFFile:
    """One GGUF file: metadata, and a TensorReader over its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._header = GGUFHeader(self.path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: not a readable GGUF file: {exc}") from exc
        self._tensors = {t.name: t for t in self._header.tensors}
        self.architecture = str(self.value("general.architecture", ""))
        self._config: ModelConfig | None = None

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (arrays as lists), or default when absent."""
        return self._header.fields.get(key, default)

    def has_key(self, key: str) -> bool:
        return key in self._header.fields

    def tensor(self, gguf_name: str) -> Any:
        """A tensor by its GGUF name (``rope_freqs.weight``), as gguf's ReaderTensor."""
        return self._tensors[gguf_name]

    def tensor_types(self) -> dict[str, str]:
        """GGUF tensor name -> quantization type name (F32, Q4_1, ...)."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            self._config = config_from_gguf(self)
        return self._config

    def has(self, name: str) -> bool:
        expert = expert_tensor(name)
        if expert is not None:
            return expert[0] in self._tensors
        target = gguf_name(name, self.architecture)
        return target is not None and target in self._tensors

    def read(self, name: str) -> np.ndarray:
        expert = expert_tensor(name)
        if expert is not None:
            return read_tensor(self._expert_stack(name, expert[0]))[expert[1]]
        target = self._target(name)
        values = self._unpermute(target, read_tensor(self._tensors[target]))
        if self.architecture in _NORM_PLUS_ONE and target.endswith("norm.weight"):
            values = values - np.float32(1.0)
        return values

    def read_quantized(self, name: str) -> QuantizedMatrix | None:
        """A 2-D tensor still in its blocks (see meshnode/model/quant.py), or None when its
        type has no such form (the caller then reads it dequantized). One expert of a
        stacked ``ffn_*_exps`` tensor is its [out, in] slice, still in its blocks."""
        expert = expert_tensor(name)
        if expert is not None:
            tensor = self._expert_stack(name, expert[0])
            raw = np.asarray(tensor.data)[expert[1]]  # [out, row bytes] of this expert
            return from_gguf(GGMLQuantizationType(tensor.tensor_type), raw, int(tensor.shape[1]))
        target = self._target(name)
        tensor = self._tensors[target]
        if len(tensor.shape) != 2:
            return None
        rows = int(tensor.shape[1])
        matrix = from_gguf(GGMLQuantizationType(tensor.tensor_type), np.asarray(tensor.data), rows)
        if matrix is None:
            return None
        return matrix.map(lambda a: self._unpermute(target, a))

    def _expert_stack(self, name: str, target: str) -> Any:
        if target not in self._tensors:
            raise MissingWeights(f"{self.path}: no tensor for {name!r}")
        return self._tensors[target]

    def _target(self, name: str) -> str:
        target = gguf_name(name, self.architecture)
        if target is None or target not in self._tensors:
            raise MissingWeights(f"{self.path}: no tensor for {name!r}")
        return target

    def _unpermute(self, target: str, rows: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's q/k row order on anything laid out by rows (values or blocks)."""
        if self.architecture in _PERMUTED and (".attn_q." in target or ".attn_k." in target):
            config = self.config
            heads = config.num_heads if ".attn_q." in target else config.num_kv_heads
            return reverse_permute(rows, heads)
        return rows


def read_tensor(tensor: Any) -> np.ndarray:
    """A GGUF ReaderTensor as a float32 array in numpy (row-major, HF) order."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        values = dequantize(np.asarray(tensor.data), qtype)
    except NotImplementedError as exc:
        raise ModelError(f"tensor {tensor.name!r}: {qtype.name} is not supported: {exc}") from exc
    return np.asarray(values, dtype=np.float32).reshape(shape)


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """A ModelConfig from llama.cpp's metadata keys (``<arch>.block_count``...)."""
    arch = file.architecture
    if arch not in _FAMILIES:
        raise UnknownArchitecture(
            f"{file.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(_FAMILIES))})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = file.value(f"{arch}.{name}", default)
        if value is None:
            raise ConfigError(f"{file.path}: metadata lacks {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    tokens = file.value("tokenizer.ggml.tokens") if not file.has_key(f"{arch}.vocab_size") else None
    vocab = int(file.value(f"{arch}.vocab_size") or len(tokens or ()))
    if not vocab:
        raise ConfigError(f"{file.path}: metadata gives no vocabulary size")
    scaling = str(file.value(f"{arch}.rope.scaling.type", "none"))
    rope = RopeConfig(theta=float(key("rope.freq_base", 10000.0)))
    if scaling == "linear":
        rope = RopeConfig(
            theta=rope.theta, rope_type="linear", factor=float(key("rope.scaling.factor"))
        )
    elif scaling not in ("none", ""):
        raise ConfigError(f"{file.path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in file.tensor_types():
        rope = dataclasses.replace(rope, freq_factors=_rope_freqs(file, key))
    eos = file.value("tokenizer.ggml.eos_token_id")
    qkv_bias = arch == "qwen2" or "blk.0.attn_q.bias" in file.tensor_types()
    fields = {
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_layers": int(key("block_count")),
        "num_heads": heads,
        "num_kv_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "vocab_size": vocab,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope": rope,
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in file.tensor_types(),
        "qkv_bias": qkv_bias,
        "bos_token_id": _maybe_int(file.value("tokenizer.ggml.bos_token_id")),
        "eos_token_ids": () if eos is None else (int(eos),),
    }
    if arch == "gemma3":
        del fields["qkv_bias"]
        return gemma3(
            num_layers=fields.pop("num_layers"),
            rope_theta=rope.theta,
            sliding_window=int(key("attention.sliding_window")),
            **fields,
        )
    experts = int(file.value(f"{arch}.expert_count", 0) or 0)
    if experts:  # llama.cpp files Mixtral under the llama architecture
        del fields["intermediate_size"]
        return ModelConfig(
            family="mixtral",
            intermediate_size=int(key("expert_feed_forward_length", key("feed_forward_length"))),
            num_experts=experts,
            experts_per_token=int(key("expert_used_count")),
            **fields,
        )
    return ModelConfig(family=_FAMILIES[arch], qk_norm=arch == "qwen3", **fields)


def _rope_freqs(file: GGUFFile, key: Any) -> tuple[float, ...]:
    """The per-pair frequency divisors of ``rope_freqs.weight`` (llama.cpp's Llama 3 scaling)."""
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", int(key("embedding_length")) // heads))
    factors = read_tensor(file.tensor("rope_freqs.weight")).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ConfigError(
            f"{file.path}: rope_freqs.weight has {factors.size} values, expected {head_dim // 2}"
        )
    return tuple(float(f) for f in factors)


def _maybe_int(value: Any) -> int | None:
    return None if value is None else int(value)
