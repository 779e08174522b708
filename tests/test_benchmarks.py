"""The benchmark's smoke run: one tiny iteration of every case, to show the
command works.  It times nothing that a test asserts on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def test_benchmark_smoke_run() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for figure in ("barrier_after", "sd.barrier", "main_first", "broadcast, small result"):
        assert f"| 2 | {figure} |" in result.stdout
    for path in ("explicit", "default"):  # the backend chosen, and none chosen
        assert f"| 3-deep syncdeco stack | {path} |" in result.stdout
