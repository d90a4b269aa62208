"""Every CBOR message has one definition in schemas/*.cddl, and golden encodings pin it.

Convention (schemas/README.md): ``schemas/golden/<schema>/<rule>.<example>.cbor``
must validate against rule ``<rule>`` of ``schemas/<schema>.cddl``, and
``schemas/golden/<schema>/invalid/<rule>.<example>.cbor`` must not. pycddl
validates against the first rule of a schema, so each check compiles the schema
with a first rule ``golden-root = <rule>`` prepended. A schema whose text has a
line ``; golden-examples: <path of a Python file>`` names a module whose
``golden_examples()`` (and optional ``invalid_examples()``) return the bytes
the code's encoder produces: they must equal the golden files.
``MESHNODE_WRITE_GOLDEN=1`` writes those files instead of comparing.
"""

from __future__ import annotations

import importlib.util
import os
import re
from functools import cache
from pathlib import Path

import pycddl
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
GOLDEN = SCHEMAS / "golden"
WRITE = os.environ.get("MESHNODE_WRITE_GOLDEN") == "1"
_HOOK = re.compile(r"^;\s*golden-examples:\s*(\S+)\s*$", re.MULTILINE)


def schema_names() -> list[str]:
    return sorted(path.stem for path in SCHEMAS.glob("*.cddl"))


@cache
def schema_for(schema: str, rule: str) -> pycddl.Schema:
    text = (SCHEMAS / f"{schema}.cddl").read_text()
    return pycddl.Schema(f"golden-root = {rule}\n{text}")


def examples_module(schema: str):
    match = _HOOK.search((SCHEMAS / f"{schema}.cddl").read_text())
    if match is None:
        return None
    path = ROOT / match.group(1)
    spec = importlib.util.spec_from_file_location(f"golden_{schema}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_files(invalid: bool) -> list[tuple[str, str, Path]]:
    found = []
    for schema in schema_names():
        folder = GOLDEN / schema / "invalid" if invalid else GOLDEN / schema
        for path in sorted(folder.glob("*.cbor")):
            found.append((schema, path.name.split(".")[0], path))
    return found


def _id(item: tuple[str, str, Path]) -> str:
    return f"{item[0]}/{item[2].name}"


if WRITE:
    for _schema in schema_names():
        _module = examples_module(_schema)
        if _module is None:
            continue
        for _name, _data in _module.golden_examples().items():
            (GOLDEN / _schema).mkdir(parents=True, exist_ok=True)
            (GOLDEN / _schema / f"{_name}.cbor").write_bytes(_data)
        for _name, _data in getattr(_module, "invalid_examples", dict)().items():
            (GOLDEN / _schema / "invalid").mkdir(parents=True, exist_ok=True)
            (GOLDEN / _schema / "invalid" / f"{_name}.cbor").write_bytes(_data)


@pytest.mark.parametrize("schema", schema_names())
def test_schema_compiles(schema):
    """Every schema file is valid CDDL."""
    pycddl.Schema((SCHEMAS / f"{schema}.cddl").read_text())


def test_golden_folders_name_schemas():
    """Every golden folder belongs to a schema file."""
    assert {p.name for p in GOLDEN.iterdir() if p.is_dir()} <= set(schema_names())


@pytest.mark.parametrize("item", golden_files(invalid=False), ids=_id)
def test_golden_encoding_validates(item):
    """A golden encoding validates against the rule its file name names."""
    schema, rule, path = item
    schema_for(schema, rule).validate_cbor(path.read_bytes())


@pytest.mark.parametrize("item", golden_files(invalid=True), ids=_id)
def test_invalid_encoding_is_refused(item):
    """An encoding under invalid/ is refused by its rule (so the rule is not vacuous)."""
    schema, rule, path = item
    with pytest.raises(pycddl.ValidationError):
        schema_for(schema, rule).validate_cbor(path.read_bytes())


@pytest.mark.parametrize(
    "schema", [s for s in schema_names() if _HOOK.search((SCHEMAS / f"{s}.cddl").read_text())]
)
def test_encoder_produces_the_golden_bytes(schema):
    """The code's encoder produces exactly the golden bytes for its fixed examples."""
    module = examples_module(schema)
    expected = {**module.golden_examples()}
    invalid = getattr(module, "invalid_examples", dict)()
    assert expected, f"{schema}: golden_examples() is empty"
    for name, data in expected.items():
        assert (GOLDEN / schema / f"{name}.cbor").read_bytes() == data, name
    for name, data in invalid.items():
        assert (GOLDEN / schema / "invalid" / f"{name}.cbor").read_bytes() == data, name
