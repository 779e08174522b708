"""The benchmark's smoke run: one tiny iteration of every case, to show the
command works.  It times nothing that a test asserts on.  The script runs
forked from the zygote (``zygote.py``: torch imported once), as ``python
benchmarks/run.py --smoke`` would run it."""

from __future__ import annotations

from pathlib import Path

from scripted import run_forked

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCH = BENCHMARKS / "run.py"


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    out = run_forked([str(BENCH), "--smoke"], tmp_path, timeout=300)
    for figure in ("barrier_after", "sd.barrier", "main_first", "broadcast, small result"):
        assert f"| 2 | {figure} |" in out, out
    for path in ("explicit", "default"):  # the backend chosen, and none chosen
        assert f"| 3-deep syncdeco stack | {path} |" in out, out


def test_hotpath_smoke_run(tmp_path: Path) -> None:
    # (its fake store must keep up with the requests the exchange makes)
    out = run_forked([str(BENCHMARKS / "hotpath.py"), "--smoke"], tmp_path, timeout=120)
    assert "| on_main_only(broadcast) small |" in out, out
