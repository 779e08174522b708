"""The examples run as their docstrings say, on the Null backend and on four
Gloo ranks under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{args} did not finish within 120s")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def _torchrun(ranks: int, script: str, tmp_path: Path) -> str:
    return _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(ranks), str(EXAMPLES / script),
        ],
        tmp_path,
    )  # fmt: skip


def test_quickstart_on_the_null_backend(tmp_path: Path) -> None:
    out = _run([sys.executable, str(EXAMPLES / "quickstart.py")], tmp_path)
    assert "[rank 0/1] my own ValueError: validation set is empty" in out
    assert "[rank 0/1] done" in out


def test_quickstart_on_four_gloo_ranks(tmp_path: Path) -> None:
    out = _torchrun(4, "quickstart.py", tmp_path)
    assert out.count("built the dataset cache") == 1
    for rank in (1, 2, 3):
        assert f"[rank {rank}/4] PeerFailedError: rank 0 raised ValueError" in out
        assert f"[rank {rank}/4] done" in out
    assert "[rank 0/4] my own ValueError" in out


def test_when_things_go_wrong_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = _torchrun(2, "when_things_go_wrong.py", tmp_path)
    assert "[rank 1] PeerFailedError: rank 0 raised ConnectionError: HTTP 503" in out
    assert "[rank 0] SyncTimeoutError: rank 0 waited 1s at barrier 'end of epoch'" in out
    assert "rank(s) 1 (last seen at main_first" in out
    assert out.count("SyncMismatchError: ranks reached different sync points") == 2
    assert "[rank 0] the group still works" in out
