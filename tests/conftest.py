"""Shared fixtures. Never import the reactor at module level here (pytest-twisted installs it)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
