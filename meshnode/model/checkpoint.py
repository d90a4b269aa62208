"""Hugging Face checkpoint folders: config.json plus safetensors, read lazily.

A folder holds ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. ``SafetensorsReader`` knows which file holds
each tensor and opens a file only when one of its tensors is read, so a worker
serving blocks 10-19 never reads the others. BF16 tensors go through the
``flax`` framework of ``safe_open`` (its numpy framework does not know BF16).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from meshnode.errors import ConfigError, MissingWeights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """Tensors of one checkpoint folder by name (see meshnode/model/weights.py)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._where = _tensor_files(self.folder)

    @property
    def files(self) -> list[Path]:
        """The weight files, in a stable order."""
        return sorted({self.folder / name for name in self._where.values()})

    def names(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise MissingWeights(f"{self.folder}: no tensor {name!r}")
        path = self.folder / self._where[name]
        with safe_open(str(path), framework="numpy") as handle:
            if handle.get_slice(name).get_dtype() != "BF16":
                return handle.get_tensor(name)
        with safe_open(str(path), framework="flax") as handle:
            return np.asarray(handle.get_tensor(name))


def _tensor_files(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index}: unreadable shard index: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise MissingWeights(
                f"{folder}: shard files listed in {INDEX_FILE} are missing: {missing}"
            )
        return dict(weight_map)
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="numpy") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}  # noqa: SIM118  # a safe_open handle is not iterable
    raise MissingWeights(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}")
