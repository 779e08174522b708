"""The pytest plugin, as a user meets it: a test file of theirs, run by pytest
in a subprocess with syncdeco installed (the plugin comes in through its
``pytest11`` entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

USER_TESTS = """
import pytest
import syncdeco as sd


@pytest.mark.ranks(3)
def test_main_first_then_others(tmp_path):
    @sd.main_first
    def build():
        saw = (tmp_path / "cache").exists()
        if sd.is_main():
            (tmp_path / "cache").write_text("built")
        return saw

    assert build() is not sd.is_main()
    assert sd.world_size() == 3


@pytest.mark.ranks(2)
def test_rank_one_fails():
    assert sd.rank() != 1, "rank one is unhappy"


@pytest.mark.parametrize(
    "n", [pytest.param(n, marks=pytest.mark.ranks(n)) for n in (2, 4)]
)
def test_world_sizes(n):
    assert sd.world_size() == n


class TestInAClass:
    @pytest.mark.ranks(2)
    def test_method(self, tmp_path):
        (tmp_path / f"method{sd.rank()}").write_text("")
        sd.barrier("written")
        assert len(list(tmp_path.glob("method*"))) == 2


@pytest.mark.ranks(2)
def test_every_rank_skips():
    pytest.skip("needs four ranks")


@pytest.mark.ranks(2)
def test_known_bug():
    pytest.xfail("waiting for a fix upstream")


@pytest.mark.ranks(3)
def test_rank_two_raises_and_the_others_hear():
    @sd.barrier_after
    def step():
        if sd.rank() == 2:
            raise RuntimeError("loss is NaN")

    step()


def test_environment_set_after_the_first_ranks_ran(monkeypatch):
    from syncdeco.testing import run_ranks

    monkeypatch.setenv("SYNCDECO_PLUGIN_PROBE", "late")
    outcomes = run_ranks(_probe, 2)
    assert [o.unwrap() for o in outcomes] == ["late", "late"]


def _probe():
    import os

    return os.environ.get("SYNCDECO_PLUGIN_PROBE")


class Odd(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


@pytest.mark.ranks(2)
def test_an_exception_that_does_not_unpickle():
    if sd.rank() == 1:
        raise Odd(1, 2)


@pytest.fixture
def unpicklable():
    return lambda: None


@pytest.mark.ranks(2)
def test_unpicklable_fixture(unpicklable):
    pass


@pytest.mark.ranks(2)
def test_compared_values_are_shown():
    expected = {"ranks": 3}
    if sd.rank() == 1:
        assert {"ranks": sd.world_size()} == expected


@pytest.mark.ranks(3, timeout=60)
def test_rank_one_fails_outside_any_sync_point():
    assert sd.rank() != 1, "rank 1 stops here"
    sd.barrier("after the check")  # the others hear that rank 1 is gone


@pytest.mark.ranks(2, launcher="slurm")
def test_slurm_environment():
    import os

    assert os.environ["SLURM_PROCID"] == str(sd.rank())
"""

HANGING_TEST = """
import os
import threading

import pytest
import syncdeco as sd


@pytest.mark.ranks(2, timeout=3)
def test_rank_one_hangs():
    with open(os.path.join({pids!r}, str(sd.rank())), "w") as f:
        f.write(str(os.getpid()))
    if sd.rank() == 1:
        threading.Event().wait()  # never set
"""


def _pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # CI set: pytest then prints the whole crash message in the short summary
    # (as on the CI runs of a user's project), which must stay one line.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _section(out: str, test: str) -> str:
    """The failure report of ``test`` in pytest's output: from its
    ``___ test ___`` header to the next header or the short summary."""
    lines = out.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip("_ \n") == test)
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i].startswith(("____", "====")) and lines[i].rstrip().endswith(("_", "="))
        ),
        len(lines),
    )
    return "".join(lines[start:end])


def test_marker_runs_tests_on_ranks_and_reports_each_rank(tmp_path: Path) -> None:
    # One pytest run for both files, the user's tests and a hanging one: a
    # second run would start pytest and a forkserver that imports torch again.
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    (tmp_path / "test_hang.py").write_text(textwrap.dedent(HANGING_TEST.format(pids=str(pids))))
    result = _pytest(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    hang = _section(out, "test_rank_one_hangs")
    out = out.replace(hang, "")  # the user's tests, and the summary
    assert "PASSED test_user.py::test_main_first_then_others" in out, out
    assert "PASSED test_user.py::test_world_sizes[2]" in out, out
    assert "PASSED test_user.py::test_world_sizes[4]" in out, out
    assert "PASSED test_user.py::TestInAClass::test_method" in out, out
    assert "PASSED test_user.py::test_slurm_environment" in out, out
    assert "SKIPPED [1]" in out and "needs four ranks" in out, out
    # the failing rank is named, with its own traceback
    assert "1 of 2 ranks failed" in out, out
    assert "--- rank 1 of 2 ---" in out and "--- rank 0 of 2 ---" not in out, out
    assert "AssertionError: rank one is unhappy" in out, out
    assert "XFAIL test_user.py::test_known_bug" in out, out
    # the rank that raised comes first, and syncdeco's own frames are left out
    assert "3 of 3 ranks failed (rank 2 RuntimeError, rank 0 PeerFailedError, " in out, out
    assert "RuntimeError: loss is NaN" in out and "_policy.py" not in out, out
    assert "PASSED test_user.py::test_environment_set_after_the_first_ranks_ran" in out, out
    # an exception that does not unpickle still shows the rank's traceback
    assert "1 of 2 ranks failed (rank 1 RuntimeError)" in out, out
    assert "test_user.Odd: 1 and 2" in out, out
    assert "cannot send fixture/argument 'unpicklable'" in out, out
    assert "During handling" not in out, out
    # asserts on the ranks are rewritten, as pytest does in its own process
    assert "AssertionError: assert {'ranks': 2} == {'ranks': 3}" in out, out
    assert "assert 1 != 1\n +  where 1 = <function rank" in out, out
    # a rank that ended is named at once to the one waiting for it, not after 60s
    assert (
        "3 of 3 ranks failed (rank 1 AssertionError, rank 0 RankExitedError, "
        "rank 2 RankExitedError)"
    ) in out, out
    assert "6 passed" in out and "7 failed" in out and "1 skipped" in out, out
    assert "1 xfailed" in out, out
    summary = out.split("short test summary info")[1]
    assert "test_rank_one_fails - Failed: 1 of 2 ranks failed (rank 1 AssertionError)\n" in summary
    assert "rank one is unhappy" not in summary, out  # tracebacks stay in FAILURES
    # the hanging test: named, where it hung, and no process left behind
    assert "rank(s) [1] of 2 died or did not finish within 3" in hang, hang
    assert "threading.Event().wait()" in hang or "in wait" in hang, hang  # where it hung
    assert "During handling" not in hang and hang.count("--- rank 1 of 2 ---") == 1, hang
    assert "--- rank 0 returned None ---" in hang, hang
    (line,) = [ln for ln in summary.splitlines() if "test_hang.py::test_rank_one_hangs" in ln]
    assert line.endswith("died or did not finish within 3s"), summary
    assert "Current thread" not in summary, summary
    for path in pids.iterdir():
        with pytest.raises(ProcessLookupError):
            os.kill(int(path.read_text()), 0)


def test_loading_the_plugin_does_not_import_torch() -> None:
    code = "import sys, syncdeco.pytest_plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
