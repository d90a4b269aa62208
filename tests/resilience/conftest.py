"""Resilience fixtures: a tiny checkpoint and its local reference (shared by the module tests).

Never import the reactor at module level here (pytest-twisted installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mesh.mesh_helpers import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_local(tiny_checkpoint):
    from meshnode.model.generate import LocalModel
    from meshnode.model.source import open_model

    return LocalModel.load(open_model(str(tiny_checkpoint)))
