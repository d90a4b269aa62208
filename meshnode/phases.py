"""``StartupPhases``: one line per start-up phase, with the time it took.

A worker opens its model, loads its span, compiles, measures its speed, joins
the DHT and announces; a client loads the head and compiles. Each of those is
a phase: ``with phases.phase("load span"):`` runs it and then reports
``"<prefix>load span: 1.2 s"`` through the injected ``report`` (a print to the
terminal, which ``twistd`` turns into a log line: see ``say``). Phases shorter than
``quiet_below`` seconds are not reported (a client that starts at once says
nothing). Time comes from the injected ``clock``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


def say(line: str, out: TextIO | None = None) -> None:
    """Print a node's line (address, phase, ready) where its operator looks.

    To ``out`` when given; else to ``sys.stdout`` as it is now (under twistd, its
    log) and, when twistd has replaced it, also to the process's own stdout (the
    terminal or file of ``twistd -n``; /dev/null for a daemon).
    """
    targets = [out] if out is not None else [sys.stdout]
    if out is None and sys.__stdout__ is not None and sys.stdout is not sys.__stdout__:
        targets.append(sys.__stdout__)
    for target in targets:
        try:
            print(line, file=target, flush=True)
        except (OSError, ValueError):  # a closed stream: the other one still says it
            pass


class StartupPhases:
    """Times named phases and reports each one as it ends."""

    def __init__(
        self,
        report: Callable[[str], None],
        prefix: str = "",
        clock: Callable[[], float] = time.monotonic,
        quiet_below: float = 0.0,
    ):
        self._report = report
        self._prefix = prefix
        self._clock = clock
        self._quiet_below = quiet_below
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name``; reported when it ends without error."""
        began = self._clock()
        yield
        elapsed = self._clock() - began
        self.timings[name] = self.timings.get(name, 0.0) + elapsed
        if elapsed >= self._quiet_below:
            self._report(f"{self._prefix}{name}: {elapsed:.1f} s")
