"""The mesh from outside Twisted: ``meshnode generate`` and the blocking ``stream`` API,
each in its own process (they run their own reactor thread)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.mesh.mesh_helpers import prompts

PROCESS_TIMEOUT = 180

STREAM_SCRIPT = """
import json, sys
from meshnode.client.api import stream
pieces = list(stream("What is the capital of France?", bootstrap=[sys.argv[1]],
                     chat=True, max_new_tokens=12))
print(json.dumps(pieces))
"""


def run(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_generate_command_json_has_route_and_local_tokens(smollm2_mesh, smollm2_local):
    """When `meshnode generate --json` runs against the mesh, then its tokens equal local
    greedy generation and `route` names the three workers with their spans."""
    ids = prompts(1, 49152, seed=31)[0]
    out = run(["-m", "meshnode", "generate", "--bootstrap", str(smollm2_mesh.join_address),
               "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "8", "--json"])
    result = json.loads(out)
    local = smollm2_local.generate(prompt_ids=ids, max_new_tokens=8)
    assert result["token_ids"] == list(local.token_ids)
    assert [hop["span"] for hop in result["route"]] == [[0, 10], [10, 20], [20, 30]]
    workers = {node.address.node_id.hex() for node in smollm2_mesh.workers()}
    assert {hop["worker"] for hop in result["route"]} <= workers


@pytest.mark.slow
def test_blocking_stream_yields_pieces(smollm2_mesh):
    """When a plain script iterates `stream(...)`, then it gets the answer piece by piece."""
    out = run(["-c", STREAM_SCRIPT, str(smollm2_mesh.join_address)])
    pieces = json.loads(out.strip().splitlines()[-1])
    assert len(pieces) > 3
    assert "Paris" in "".join(pieces)
