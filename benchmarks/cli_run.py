"""Runs ``tokenmill run`` as a user would (a subprocess), timed as a whole, for the benchmarks that measure jobs."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CliRun:
    wall_s: float  # the whole command: validation pass, model load, job, summary
    stderr: str

    def summary_tokens(self) -> tuple[int, int]:
        """(input, output) tokens of the run's summary line."""
        m = re.search(r"this run: ([\d,]+) input \+ ([\d,]+) output tokens", self.stderr)
        return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))

    def find(self, pattern: str, default=None):
        """The first group of ``pattern`` in the summary, or ``default``."""
        m = re.search(pattern, self.stderr)
        return m.group(1) if m else default


def run_cli(src: Path, out: Path, *args) -> CliRun:
    """``tokenmill run SRC -o OUT ARGS``; raises with the summary when it fails."""
    cmd = [sys.executable, "-m", "tokenmill.cli", "run", str(src), "-o", str(out), *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return CliRun(wall, p.stderr)
