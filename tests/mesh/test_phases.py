"""Start-up phases: one line per phase with its time, quiet for the short ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshnode.commands.demo import _worker_phases
from meshnode.phases import StartupPhases


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_phase_is_one_line_with_its_time():
    """When phases run, then each ends with one line naming it and its seconds."""
    lines: list[str] = []
    clock = FakeClock()
    phases = StartupPhases(lines.append, prefix="meshnode worker: ", clock=clock)
    with phases.phase("open model"):
        clock.now += 1.25
    with phases.phase("compile"):
        clock.now += 10.0
    assert lines == ["meshnode worker: open model: 1.2 s", "meshnode worker: compile: 10.0 s"]
    assert phases.timings == {"open model": 1.25, "compile": 10.0}


def test_short_phases_are_quiet_and_failed_ones_unreported():
    """When a phase is shorter than quiet_below, then it says nothing; when it fails, then
    the error propagates and no line claims it finished."""
    lines: list[str] = []
    clock = FakeClock()
    phases = StartupPhases(lines.append, clock=clock, quiet_below=1.0)
    with phases.phase("quick"):
        clock.now += 0.5
    with pytest.raises(ValueError), phases.phase("broken"):
        clock.now += 3.0
        raise ValueError("no")
    assert lines == []


def test_demo_reads_the_phases_from_a_worker_log(tmp_path):
    """When a worker's twistd log holds its phase lines, then the demo shows them on one."""
    log = tmp_path / "twistd.log"
    log.write_text(
        "2026-01-01T00:00:00+0000 [stdout#info] meshnode worker: join DHT: 0.1 s\n"
        "2026-01-01T00:00:01+0000 [stdout#info] meshnode worker: load span 0:10: 2.5 s\n"
        "2026-01-01T00:00:02+0000 [stdout#info] meshnode worker 127.0.0.1:1#ab serving\n"
    )
    node = SimpleNamespace(log_path=log, folder=tmp_path)
    assert _worker_phases(node) == "join DHT 0.1 s, load span 0:10 2.5 s"
