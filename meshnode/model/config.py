"""Model configuration: one frozen dataclass for every supported decoder family.

Owns the translation of a Hugging Face ``config.json`` (both the older top-level
``rope_theta`` / ``rope_scaling`` keys and transformers 5's ``rope_parameters``)
and of GGUF metadata into :class:`ModelConfig`, and the checks that reject what
the engine cannot run. Supported families: ``llama`` (Llama 1-3, SmolLM),
``mistral`` (sliding-window attention), ``qwen2`` (q/k/v biases), ``qwen3``
(qk-norm), ``gemma3`` (Gemma 3 text: see meshnode/model/families/gemma3.py)
``mixtral`` (sparse mixture of experts) and ``phi3`` (fused q/k/v and gate/up
projections, longrope).
Named presets (``ModelConfig.gemma3_270m()``, ``ModelConfig.smollm2_135m()``)
build a config without a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshnode.errors import ConfigError, UnknownArchitecture

#: families the engine runs; a config naming another one raises UnknownArchitecture
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "phi3")

#: rope_type values the engine implements (see meshnode/model/rope.py)
ROPE_TYPES = ("default", "linear", "llama3", "longrope")

_ARCHITECTURE_TO_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Phi3ForCausalLM": "phi3",
}
_MODEL_TYPE_TO_FAMILY = {"gemma3_text": "gemma3"}
#: Gemma 3's defaults where a config (or a GGUF file) does not say
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_SLIDING_WINDOW_PATTERN = 6


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
    #: longrope (Phi-3): per-pair divisors within / beyond the original context, and the
    #: factor cos and sin are multiplied by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


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
    #: MLP activation, transformers' name (silu; gelu_pytorch_tanh for Gemma)
    activation: str = "silu"
    #: per-head RMSNorm of q and k before rope (Qwen3, Gemma 3)
    qk_norm: bool = False
    #: scores scaled by this ** -0.5 instead of head_dim ** -0.5 (Gemma)
    query_pre_attn_scalar: float | None = None
    #: tanh softcap of attention scores / of final logits (Gemma 2 style); None = none
    attn_softcap: float | None = None
    final_softcap: float | None = None
    #: rope of the sliding-window layers when it differs from ``rope`` (Gemma 3)
    local_rope: RopeConfig | None = None
    #: sparse mixture of experts (Mixtral): experts per layer, experts used per position
    num_experts: int = 0
    experts_per_token: int = 0

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
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"{self.experts_per_token} experts per token out of {self.num_experts}"
            )
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"{len(self.layer_windows)} layer windows for {self.num_layers} layers"
            )

    @classmethod
    def smollm2_135m(cls) -> ModelConfig:
        """SmolLM2-135M(-Instruct): Llama, 30 layers, hidden 576, 9 heads, 3 KV heads."""
        return cls(
            family="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            vocab_size=49152,
            rms_norm_eps=1e-5,
            rope=RopeConfig(theta=100000.0),
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )

    @classmethod
    def gemma3_270m(cls) -> ModelConfig:
        """Gemma 3 270M: 18 layers, hidden 640, 4 heads, 1 KV head, head_dim 256, every 6th
        layer global (rope 1e6), the others a 512-position window (rope 1e4)."""
        return gemma3(
            hidden_size=640,
            intermediate_size=2048,
            num_layers=18,
            num_heads=4,
            num_kv_heads=1,
            head_dim=256,
            vocab_size=262144,
            rope_theta=1_000_000.0,
            sliding_window=512,
            max_position_embeddings=32768,
            bos_token_id=2,
            eos_token_ids=(1,),
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
        bias = bool(raw.get("attention_bias", False))
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
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", family == "gemma3")),
            "qkv_bias": family == "qwen2" or bias,
            "o_bias": family != "qwen2" and bias,
            "layer_windows": _hf_windows(raw, family, layers),
            "bos_token_id": _optional_int(raw.get("bos_token_id")),
            "eos_token_ids": _id_tuple(raw.get("eos_token_id")),
            "activation": str(raw.get("hidden_activation") or raw.get("hidden_act") or "silu"),
            "qk_norm": family in ("qwen3", "gemma3"),
        }
        if family == "gemma3":
            config.update(_hf_gemma3(raw))
        if family == "mixtral":
            config["num_experts"] = int(raw["num_local_experts"])
            config["experts_per_token"] = int(raw["num_experts_per_tok"])
    except KeyError as exc:
        raise ConfigError(f"config lacks required key {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config has a malformed value: {exc}") from exc
    supported = ("gelu_pytorch_tanh",) if family == "gemma3" else ("silu", "swish")
    if config["activation"] not in supported:
        raise ConfigError(
            f"activation {config['activation']!r} is not supported for {family} "
            f"(only {', '.join(supported)})"
        )
    if raw.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported")
    return ModelConfig(**config)


def gemma3(
    *,
    num_layers: int,
    rope_theta: float,
    sliding_window: int,
    layer_types: list[str] | None = None,
    local_rope_theta: float = GEMMA3_LOCAL_ROPE_THETA,
    query_pre_attn_scalar: float | None = None,
    **fields: Any,
) -> ModelConfig:
    """A Gemma 3 config: windows per layer from ``layer_types`` or, without them, every
    6th layer global (as transformers and llama.cpp do); rope base per kind of layer."""
    head_dim = int(fields["head_dim"])
    fields.setdefault("rms_norm_eps", 1e-6)
    fields.setdefault("tie_word_embeddings", True)
    rope = fields.pop("rope", None) or RopeConfig(theta=float(rope_theta))
    return ModelConfig(
        family="gemma3",
        num_layers=num_layers,
        rope=rope,
        local_rope=RopeConfig(theta=float(local_rope_theta)),
        layer_windows=gemma3_windows(num_layers, sliding_window, layer_types),
        activation="gelu_pytorch_tanh",
        qk_norm=True,
        query_pre_attn_scalar=float(query_pre_attn_scalar or head_dim),
        **fields,
    )


def gemma3_windows(
    layers: int, window: int, layer_types: list[str] | None = None
) -> tuple[int, ...]:
    if not layer_types:
        pattern = GEMMA3_SLIDING_WINDOW_PATTERN
        layer_types = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ]
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def _hf_gemma3(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3's rope per kind of layer (transformers 5: rope_parameters keyed by layer type;
    before: rope_theta, rope_local_base_freq, rope_scaling), scalar and softcaps."""
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        rope = _hf_rope({"rope_parameters": full, "rope_theta": 1_000_000.0, **_no_rope(raw)})
        local_rope = _hf_rope(
            {"rope_parameters": local, "rope_theta": GEMMA3_LOCAL_ROPE_THETA, **_no_rope(raw)}
        )
    else:
        rope = _hf_rope({"rope_theta": 1_000_000.0, **raw})
        local_rope = RopeConfig(theta=float(raw.get("rope_local_base_freq", 10000.0)))
    if local_rope.rope_type != "default":
        raise ConfigError(f"gemma3 local rope type {local_rope.rope_type!r} is not supported")
    return {
        "rope": rope,
        "local_rope": local_rope,
        "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar") or 256),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping (only
        # Gemma 2's does): neither do we, so the two stay equal
        "attn_softcap": None,
        "final_softcap": _optional_float(raw.get("final_logit_softcapping")),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
    }


def _no_rope(raw: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("max_position_embeddings",)
    return {k: raw[k] for k in keep if k in raw}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _hf_family(raw: Mapping[str, Any]) -> str:
    model_type = raw.get("model_type")
    if model_type in _MODEL_TYPE_TO_FAMILY:
        return _MODEL_TYPE_TO_FAMILY[model_type]
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
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type) if rope_type != "su" else "longrope",
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=_original_context(raw, merged),
        **(_longrope(raw, merged) if rope_type in ("longrope", "su") else {}),
    )


def _original_context(raw: Mapping[str, Any], merged: Mapping[str, Any]) -> int:
    return int(
        merged.get("original_max_position_embeddings")
        or raw.get("original_max_position_embeddings")
        or raw.get("max_position_embeddings")
        or 8192
    )


def _longrope(raw: Mapping[str, Any], merged: Mapping[str, Any]) -> dict[str, Any]:
    """Phi-3's longrope ('su' in older configs) as transformers computes it: the attention
    factor from ``factor``, else from max / original context."""
    original = _original_context(raw, merged)
    factor = merged.get("factor") or int(raw.get("max_position_embeddings") or original) / original
    attention = merged.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "short_factor": tuple(float(f) for f in merged["short_factor"]),
        "long_factor": tuple(float(f) for f in merged["long_factor"]),
        "attention_factor": float(attention),
    }


def _hf_windows(raw: Mapping[str, Any], family: str, layers: int) -> tuple[int, ...]:
    window = raw.get("sliding_window")
    if family in ("mistral", "mixtral", "phi3"):
        return (int(window or 0),) * layers
    if family == "gemma3":
        return gemma3_windows(layers, int(window or 4096), raw.get("layer_types"))
    if family in ("qwen2", "qwen3"):
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
