"""The scale benchmark's smoke run: 16 simulated ranks in one worker process, the three designs,
to show the command works end to end.  It asserts no speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"


def test_scale_smoke_run(tmp_path: Path) -> None:
    png = tmp_path / "scale.png"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for design in (
        "Queues (flat star, <= 0.1)",
        "Keys (batched flat star)",
        "Nodes (a store per node, 0.2)",
    ):
        assert f"| 16 | {design} |" in result.stdout
    assert "How many times more the flat stars cost than Nodes" in result.stdout
    assert "Waiting ranks' steady load on the job's store" in result.stdout
    assert "Targets (issue 10)" in result.stdout
    image = matplotlib.image.imread(png)  # decoded, not just its header
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
