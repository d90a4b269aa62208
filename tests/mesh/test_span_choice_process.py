"""A worker started without --blocks takes the blocks the mesh lacks; status shows coverage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.mesh.conftest import start_mesh

STATUS_TIMEOUT = 120


def status(mesh, model: str) -> tuple[int, dict]:
    command = [
        sys.executable,
        "-m",
        "meshnode",
        "status",
        "--json",
        "--bootstrap",
        str(mesh.join_address),
        "--model",
        model,
    ]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=STATUS_TIMEOUT
    )
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
def test_num_blocks_fills_the_gap_and_status_reports_it(tiny_checkpoint, tmp_path):
    """When blocks 0-2 are served and a worker starts with --num-blocks 3, then it serves
    3-5, and status goes from 'blocks 3-5 missing' (exit 1) to 'covered' (exit 0); when that
    worker stops cleanly, then its records say offline and the blocks are missing again."""
    model = str(tiny_checkpoint)
    mesh = start_mesh(model, ("0:3",), tmp_path)
    try:
        code, before = status(mesh, model)
        assert (code, before["covered"], before["missing"]) == (1, False, [3, 4, 5])
        node = mesh.start_worker(None, extra=["--num-blocks", "3"])
        assert "serving blocks 3:6" in (node.folder / "stdout.log").read_text()
        code, after = status(mesh, model)
        assert (code, after["covered"], after["missing"]) == (0, True, [])
        assert sorted(row["span"] for row in after["workers"]) == [[0, 3], [3, 6]]
        node.stop()
        code, gone = status(mesh, model)
        assert (code, gone["missing"]) == (1, [3, 4, 5])
        offline = [row for row in gone["workers"] if row["span"] == [3, 6]]
        assert [row["state"] for row in offline] == ["offline"]
    finally:
        mesh.stop()
