"""Model tests: no hub access, the model helpers importable, and Gemma 3 loaded once.

Gemma 3 270M and transformers' float32 model over the same GGUF take about a
minute and a half to load on 2 cores: the session loads them once for every
file that compares against them (``test_model_gemma3``, ``test_model_mesh``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def gemma3_source():
    from meshnode.model.source import open_model

    return open_model("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_local(gemma3_source):
    from meshnode.model.generate import LocalModel

    return LocalModel.load(gemma3_source)


@pytest.fixture(scope="session")
def gemma3_reference():
    """(transformers model, transformers tokenizer) over the same GGUF file."""
    from meshnode.model.source import gemma3_270m_path
    from tests.model.model_helpers import gguf_reference

    return gguf_reference(gemma3_270m_path())


@pytest.fixture(scope="session")
def native_cache_for(tmp_path_factory):
    """``native_cache_for(march)``: a kernel cache folder for builds with
    ``MESHNODE_NATIVE_MARCH=march``, one a session, shared by the tests of each vector path
    (each build of the kernels takes several seconds)."""
    folders: dict[str, Path] = {}

    def folder(march: str) -> Path:
        if march not in folders:
            folders[march] = tmp_path_factory.mktemp(f"native-{march}")
        return folders[march]

    return folder
