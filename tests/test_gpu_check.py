"""benchmarks/gpu_check.py on a machine without a GPU: every check SKIPPED,
exit 0; its rehearsal (CPU tensors for CUDA ones, Gloo for NCCL) runs the
ranks and the comparisons; and the driver turns the ranks' reports into
PASS, FAIL and SKIP lines as its docstring says."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from scripted import run_forked

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
CHECKS = ("nccl-group", "local-rank-device", "nccl-wire", "gloo-cuda-broadcast", "nccl-broadcast")


def run_script(*args: str, tmp_path: Path, timeout: float) -> str:
    """``python benchmarks/gpu_check.py ARGS...``, forked from the zygote
    (``zygote.py``: torch imported once); its output, stdout and stderr
    together.  Fails the test if it exits non-zero or runs past ``timeout``."""
    return run_forked([str(SCRIPT), *args], tmp_path, timeout=timeout)


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines(stdout: str) -> dict[str, str]:
    """Check name -> its status, from the script's PASS/FAIL/SKIP lines."""
    found = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("PASS", "FAIL", "SKIP"):
            found[rest.split(":")[0]] = status.strip()
    return found


def test_without_a_gpu_every_check_is_skipped(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run benchmarks/gpu_check.py itself")
    out = run_script(tmp_path=tmp_path, timeout=120)
    assert lines(out) == dict.fromkeys(CHECKS, "SKIP"), out
    assert out.count("no GPU (torch.cuda.is_available() is False") == len(CHECKS), out
    assert "every check SKIPPED (no GPU)" in out


def test_the_rehearsal_runs_every_check_but_nccl_on_real_ranks(tmp_path: Path) -> None:
    # It checks the script (ranks, reports, comparisons, timings), not CUDA.
    out = run_script("--rehearse", tmp_path=tmp_path, timeout=240)
    assert "REHEARSAL on the CPU" in out
    assert lines(out) == {**dict.fromkeys(CHECKS[:4], "PASS"), CHECKS[4]: "SKIP"}, out
    assert "rank 1: rank 1 on cpu (member, received)" in out
    assert "on_main_only(broadcast=True) -> 1 MiB CPU tensor: rank 0: " in out
    assert "no check failed" in out


def pass_line(check: str, rank: int) -> str:
    return f'@@gpu_check {{"check": "{check}", "status": "PASS", "detail": "ok", "rank": {rank}}}'


def drive(
    monkeypatch: pytest.MonkeyPatch, results: list[tuple[int, str, str]], skip_if: object = None
) -> tuple[ModuleType, dict[str, str]]:
    module = load()
    monkeypatch.setattr(module, "start_ranks", lambda *args: results)
    driver = module.Driver()
    driver.run("gloo", ("gloo-cuda-broadcast",), 2, [0, 1], timeout=60, skip_if=skip_if)
    return module, driver.statuses


def test_a_check_passes_only_when_every_rank_passed_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    both = [(0, pass_line("gloo-cuda-broadcast", r), "") for r in (0, 1)]
    assert drive(monkeypatch, both)[1] == {"gloo-cuda-broadcast": "PASS"}

    failed = '@@gpu_check {"check": "gloo-cuda-broadcast", "status": "FAIL", '
    failed += '"detail": "AssertionError: f32: on cpu, not cuda:0", "rank": 1}'
    one_failed = [both[0], (0, failed, "")]
    assert drive(monkeypatch, one_failed)[1] == {"gloo-cuda-broadcast": "FAIL"}
    assert "rank 1: AssertionError: f32: on cpu, not cuda:0" in capsys.readouterr().out

    hung = [both[0], (-9, "", "")]
    assert drive(monkeypatch, hung)[1] == {"gloo-cuda-broadcast": "FAIL"}
    assert "rank 1 still running after 60 s: killed" in capsys.readouterr().out

    crashed = [(1, "", "Traceback ...\nRuntimeError: CUDA error"), (1, "", "")]
    assert drive(monkeypatch, crashed)[1] == {"gloo-cuda-broadcast": "FAIL"}
    assert "rank 0, exit status 1, no report: Traceback ... | RuntimeError: CUDA error" in (
        capsys.readouterr().out
    )


def test_nccls_refusal_of_two_ranks_on_one_gpu_is_a_skip(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load()
    refusal = (
        "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3690, "
        "invalid usage (run with NCCL_DEBUG=WARN for details), NCCL version 2.27.5\n"
        "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.\n"
        "Last error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1d000"
    )
    results = [(1, "", refusal), (1, "", refusal)]
    statuses = drive(monkeypatch, results, skip_if=module.duplicate_gpu)[1]
    assert statuses == {"gloo-cuda-broadcast": "SKIP"}
    out = capsys.readouterr().out
    assert "NCCL refuses two ranks on one GPU (Duplicate GPU detected : rank 1 and rank 0" in out
    assert module.duplicate_gpu("RuntimeError: CUDA error: out of memory") is None
    assert module.busy_gpu("CUDA-capable device(s) is/are busy or unavailable") is not None
