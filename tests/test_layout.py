"""The package layout as a specification: which packages may import which.

Read from the source with ``ast`` (every ``import`` statement, at any depth,
relative ones resolved), not from a hand-kept list, so a new module that
breaks a rule fails here.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import meshnode
from meshnode import _tls_private

ROOT = Path(meshnode.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


GRAPH = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def importers(inside: str, of: str) -> list[str]:
    """``module -> imported`` pairs where a module under ``inside`` imports ``of``."""
    return sorted(
        f"{module} -> {name}"
        for module, names in GRAPH.items()
        if module == inside or module.startswith(inside + ".")
        for name in names
        if name == of or name.startswith(of + ".")
    )


def test_the_graph_is_read_from_the_source():
    """When the reader works, then it sees imports that are known to be there."""
    assert "meshnode.tls" in GRAPH["meshnode.wire.endpoint"]
    assert "meshnode.inference.records" in GRAPH["meshnode.worker.service"]
    assert "meshnode.inference.records" in GRAPH["meshnode.client.routing.route"]


@pytest.mark.parametrize(
    ("inside", "of"),
    [
        ("meshnode.worker", "meshnode.client"),
        ("meshnode.client", "meshnode.worker"),
        ("meshnode.tls", "meshnode.wire"),
        ("meshnode._tls_private", "meshnode.wire"),
        ("meshnode.identity", "meshnode.tls"),
        ("meshnode.inference", "meshnode.worker"),
        ("meshnode.inference", "meshnode.client"),
        ("meshnode.inference", "meshnode.model"),
        ("meshnode.wire", "meshnode.dht"),
        ("meshnode.wire", "meshnode.model"),
        ("meshnode.dht", "meshnode.model"),
        ("meshnode.model", "meshnode.wire"),
        ("meshnode.model", "meshnode.dht"),
        ("meshnode.model", "meshnode.worker"),
        ("meshnode.model", "meshnode.client"),
        ("meshnode.swarm", "meshnode.wire"),
        ("meshnode.swarm", "meshnode.dht"),
        ("meshnode.compute", "meshnode.worker"),
        ("meshnode.compute", "meshnode.client"),
        ("meshnode.serve", "meshnode.worker"),
        ("meshnode.client", "meshnode.serve"),
    ],
)
def test_dependencies_point_one_way(inside, of):
    """When a module under ``inside`` imports ``of``, then the layout is broken."""
    assert importers(inside, of) == []


def test_every_private_override_is_listed_for_the_upgrade_check():
    """When a class in ``_tls_private`` overrides a private name of its base, then the name
    is in ``PRIVATE_NAMES`` under that base, which ``test_tls_private`` checks on upgrade."""
    unlisted = []
    for _, cls in inspect.getmembers(_tls_private, inspect.isclass):
        if cls.__module__ != _tls_private.__name__:
            continue
        for name in vars(cls):
            if not name.startswith("_") or name.startswith("__"):
                continue
            for base in cls.__mro__[1:]:
                if name in vars(base):
                    if name not in _tls_private.PRIVATE_NAMES.get(base, ()):
                        unlisted.append(f"{cls.__name__}.{name} over {base.__name__}")
                    break
    assert unlisted == []


def test_every_error_says_when_it_is_raised():
    """When an exception is added to ``meshnode/errors.py``, then it has its own docstring
    and a ``code`` string (the wire sends it in error frames)."""
    from meshnode import errors

    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if cls.__module__ == errors.__name__
    ]
    assert len(classes) > 30
    assert [c.__name__ for c in classes if not (c.__dict__.get("__doc__") or "").strip()] == []
    assert [c.__name__ for c in classes if not isinstance(getattr(c, "code", None), str)] == []
