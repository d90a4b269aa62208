"""Gemma 3 270M and a tiny Mixtral through 2-worker meshes: real processes on loopback TLS.

Each mesh is a bootstrap node and two workers (``LocalMesh``); a client process
waits until every block is covered, then generates greedily from token ids
(``meshnode.client.api.generate_ids``) and prints the result as JSON. The
tokens must equal transformers' greedy tokens, and local generation's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.mesh.conftest import start_mesh
from tests.model.model_helpers import build_reference, reference_greedy, write_checkpoint

pytestmark = pytest.mark.slow

CLIENT = """
import json, os, sys
from meshnode.client import api
bootstrap, model, ids, count = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
api.wait_for_route([bootstrap], model, 180.0)
result = api.generate_ids(ids, [bootstrap], model, max_new_tokens=count)
print(json.dumps({"token_ids": list(result.token_ids), "route": list(result.route)}), flush=True)
os._exit(0)
"""
#: seconds a client process may take (model loading and compiling included)
CLIENT_TIMEOUT = 900


def mesh_generate(mesh, model: str, ids: list[int], count: int) -> dict:
    """Greedy generation through ``mesh`` in a client process."""
    args = [sys.executable, "-c", CLIENT, str(mesh.join_address), model, json.dumps(ids)]
    out = subprocess.run(
        [*args, str(count)],
        check=False,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])




def test_mixtral_through_two_workers_matches_transformers(tmp_path):
    """When a tiny Mixtral (4 experts, 2 per position) is split over two workers (blocks
    0-1 and 2), then 16 greedy tokens through them equal transformers' and each worker
    holds only its own layers' experts."""
    from meshnode.model.source import open_model

    reference = build_reference("mixtral")
    folder = write_checkpoint(reference, tmp_path / "tiny-mixtral")
    source = open_model(folder)
    params = source.load_span_params(2, 3)
    assert {n for n in params.layers[0] if n.startswith("expert.")} == {
        f"expert.{e}.{w}" for e in range(4) for w in ("w_gate_up", "w_down")
    }
    ids = np.random.default_rng(5).integers(0, 96, size=12).tolist()
    mesh = start_mesh(str(folder), ("0:2", "2:3"), tmp_path / "mesh")
    try:
        result = mesh_generate(mesh, str(folder), ids, 16)
    finally:
        mesh.stop()
    assert result["token_ids"] == reference_greedy(reference, ids, 16)
    assert [hop["span"] for hop in result["route"]] == [[0, 2], [2, 3]]


@pytest.mark.timeout(1500)  # two model loads and three processes on a shared 2-core machine
def test_gemma3_through_two_workers_matches_transformers_and_local(
        tmp_path, gemma3_source, gemma3_local, gemma3_reference):
    """When Gemma 3 270M is split over two workers (blocks 0-8 and 9-17), then greedy tokens
    for a text prompt through them equal local generation's and transformers'."""
    ids = gemma3_source.tokenizer().encode("The capital of France is")
    local = gemma3_local.generate(prompt_ids=ids, max_new_tokens=24)
    expected = reference_greedy(gemma3_reference[0], ids, 24)
    mesh = start_mesh("gemma3-270m", ("0:9", "9:18"), tmp_path / "mesh")
    try:
        result = mesh_generate(mesh, "gemma3-270m", ids, 24)
    finally:
        mesh.stop()
    assert result["token_ids"] == list(local.token_ids)
    assert result["token_ids"] == expected[: len(result["token_ids"])]
    assert [hop["span"] for hop in result["route"]] == [[0, 9], [9, 18]]
