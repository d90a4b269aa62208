"""Model configuration: one frozen dataclass for every supported decoder family.

Owns the translation of a Hugging Face ``config.json`` (both the older top-level
``rope_theta`` / ``rope_scaling`` keys and transformers 5's ``rope_parameters``)
and of GGUF metadata into :class:`ModelConfig`, and the checks that reject what
the engine cannot run. Supported families: ``llama`` (Llama 1-3, SmolLM),
``mistral`` (sliding-window attention) and ``qwen2`` (q/k/v biases).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshnode.errors import ConfigError, UnknownArchitecture

#: families the engine runs; a config naming another one raises UnknownArchitecture
FAMILIES = ("llama", "mistral", "qwen2")

#: rope_type values the engine implements (see meshnode/model/rope.py)
ROPE_TYPES = ("default", "linear", "llama3")

_ARCHITECTURE_TO_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; the scaling fields matter only for their rope_type."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    #: per channel pair, divisors of the inverse frequencies (GGUF's ``rope_freqs``
    #: tensor, in which llama.cpp's converter bakes Llama 3 scaling); () = none
    freq_factors: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the blocks, the head and the loaders need to know about a model."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    #: per layer: attend to at most this many most recent positions; 0 = no window
    layer_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UnknownArchitecture(
                f"model family {self.family!r} is not supported (supported: {', '.join(FAMILIES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.rope.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope.rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"{len(self.layer_windows)} layer windows for {self.num_layers} layers"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> str:
        """A canonical JSON form, the basis of fingerprints."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def load_hf_config(folder: Path) -> ModelConfig:
    """Read ``folder/config.json``; ConfigError if it is missing or unreadable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf_dict(raw)


def config_from_hf_dict(raw: Mapping[str, Any]) -> ModelConfig:
    """Turn a transformers config dict into a ModelConfig."""
    family = _hf_family(raw)
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        layers = int(raw["num_hidden_layers"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        config = {
            "family": family,
            "hidden_size": hidden,
            "intermediate_size": int(raw["intermediate_size"]),
            "num_layers": layers,
            "num_heads": heads,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": int(raw["vocab_size"]),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
            "rope": _hf_rope(raw),
            "max_position_embeddings": int(raw.get("max_position_embeddings") or 2048),
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "qkv_bias": family == "qwen2" or bool(raw.get("attention_bias", False)),
            "o_bias": family != "qwen2" and bool(raw.get("attention_bias", False)),
            "layer_windows": _hf_windows(raw, family, layers),
            "bos_token_id": _optional_int(raw.get("bos_token_id")),
            "eos_token_ids": _id_tuple(raw.get("eos_token_id")),
        }
    except KeyError as exc:
        raise ConfigError(f"config lacks required key {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config has a malformed value: {exc}") from exc
    activation = raw.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):
        raise ConfigError(f"hidden_act {activation!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported")
    return ModelConfig(**config)


def _hf_family(raw: Mapping[str, Any]) -> str:
    model_type = raw.get("model_type")
    if model_type in FAMILIES:
        return str(model_type)
    for name in raw.get("architectures") or ():
        if name in _ARCHITECTURE_TO_FAMILY:
            return _ARCHITECTURE_TO_FAMILY[name]
    raise UnknownArchitecture(
        f"model_type {model_type!r} / architectures {raw.get('architectures')!r} "
        f"is not supported (supported: {', '.join(FAMILIES)})"
    )


def _hf_rope(raw: Mapping[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings")
            or raw.get("max_position_embeddings")
            or 8192
        ),
    )


def _hf_windows(raw: Mapping[str, Any], family: str, layers: int) -> tuple[int, ...]:
    window = raw.get("sliding_window")
    if family == "mistral":
        return (int(window or 0),) * layers
    if family == "qwen2":
        if not raw.get("use_sliding_window") or not window:
            return (0,) * layers
        types = raw.get("layer_types")
        if types:
            return tuple(int(window) if t == "sliding_attention" else 0 for t in types)
        first = int(raw.get("max_window_layers", layers))
        return tuple(int(window) if i >= first else 0 for i in range(layers))
    return (0,) * layers


def _optional_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)
