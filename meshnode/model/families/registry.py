"""Which family module builds a config's blocks, and the head's per-family quirks."""

from __future__ import annotations

import dataclasses
from types import ModuleType

from meshnode.errors import UnknownArchitecture
from meshnode.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The client head's family quirks: the final norm's weight is (offset + w); the
    embedding is multiplied by ``embed_scale`` (None: not at all)."""

    norm_offset: float = 0.0
    embed_scale: float | None = None


def family(config: ModelConfig) -> ModuleType:
    """The module (llama, gemma3) whose build_block composes this config's blocks."""
    from meshnode.model.families import gemma3, llama, mixtral

    modules = {
        "llama": llama,
        "mistral": llama,
        "qwen2": llama,
        "qwen3": llama,
        "gemma3": gemma3,
        "mixtral": mixtral,
        "phi3": llama,
    }
    if config.family not in modules:
        raise UnknownArchitecture(f"no block builder for family {config.family!r}")
    return modules[config.family]


def head_spec(config: ModelConfig) -> HeadSpec:
    return family(config).head_spec(config)


def build_stack(config: ModelConfig, start: int, layers: tuple[dict, ...]):
    """A DecoderStack of blocks [start, start + len(layers)) from their parameter dicts."""
    from meshnode.model.layers.block import DecoderStack

    build = family(config).build_block
    return DecoderStack([build(config, start + i, p) for i, p in enumerate(layers)])
