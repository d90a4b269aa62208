"""Shared fixtures and the rule that keeps ``-m "not slow"`` fast.

Never import the reactor at module level here (pytest-twisted installs it).

A test that starts a Python process (a worker, a bootstrap node, a command) or
opens a real model's weights (a weight file over ``REAL_MODEL_BYTES``) must be
marked ``@pytest.mark.slow``; an unmarked one that tries fails at once with a
message saying so. The check is made while the test, and the fixtures it sets
up, run, so session-scoped fixtures are covered too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: weight files at least this large are real models, not the tests' tiny checkpoints
REAL_MODEL_BYTES = 32 << 20

_running_slow = [True]  # outside a test (collection, session teardown) nothing is checked


class NotMarkedSlow(Exception):
    """An unmarked test started a process or opened a real model."""


def _refuse(what: str) -> None:
    if not _running_slow[0]:
        raise NotMarkedSlow(f"this test {what}: mark it @pytest.mark.slow")


def _is_python(args: object) -> bool:
    first = args[0] if isinstance(args, (list, tuple)) and args else args
    name = Path(str(first)).name
    return str(first) == sys.executable or name.startswith(("python", "twistd", "meshnode"))


_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self, args, *rest, **kwargs):
    if _is_python(args):
        _refuse(f"starts a process ({args!r:.80})")
    _popen_init(self, args, *rest, **kwargs)


def _guard_real_models() -> None:
    from meshnode.model import gguf_file

    opened = gguf_file.GGUFFile.__init__

    def guarded(self, path, *rest, **kwargs):
        if Path(path).stat().st_size >= REAL_MODEL_BYTES:
            _refuse(f"opens a real model ({Path(path).name})")
        opened(self, path, *rest, **kwargs)

    gguf_file.GGUFFile.__init__ = guarded


def pytest_configure(config):
    subprocess.Popen.__init__ = _guarded_popen_init
    _guard_real_models()
    _no_background_precompiling()


def _no_background_precompiling() -> None:
    """Workers of the tests' meshes do not compile programs ahead in the background: on 2
    cores that compiling competes with the very steps a test runs, and each test compiles
    only the programs it uses. The tests of precompiling ask for it
    (``LocalMesh(precompile=True)``); ``MESHNODE_TEST_PRECOMPILE=1`` turns it on for all."""
    from meshnode.testing.processes import LocalMesh

    LocalMesh.precompile = os.environ.get("MESHNODE_TEST_PRECOMPILE") == "1"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running_slow[0] = item.get_closest_marker("slow") is not None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    _running_slow[0] = True
