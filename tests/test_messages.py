"""What a failure prints, on real ranks started as a launcher starts them:
each rank's traceback in one piece, prefixed with its rank, showing the
user's call, one frame of syncdeco, and the error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from scripted import kill_all

from syncdeco.testing import launcher_env

SCRIPT = Path(__file__).parent / "scripts" / "first_failure.py"
SYNCDECO = Path(__file__).resolve().parent.parent / "syncdeco"
BOUND = 120.0  # seconds for the whole run


def _both_fail_at_the_first_sync_point(tmp_path: Path) -> tuple[list[int], str]:
    """The two ranks' exit statuses, and what they wrote to the stderr they
    share (one file, opened for appending, as a terminal is shared)."""
    # torchrun's variables: the ranks are clients of a store this test hosts,
    # as torchrun's agent hosts one; no process group exists before the run.
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, 2, is_master=True, wait_for_workers=False
    )
    shared = tmp_path / "stderr"
    procs = []
    with open(shared, "ab", buffering=0) as stderr:
        for rank in range(2):
            env = {
                **os.environ,
                **launcher_env("torchrun", rank, 2, 2),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "TMPDIR": str(tmp_path),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            )
        try:
            codes = [proc.wait(timeout=BOUND) for proc in procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks did not end within {BOUND}s:\n{shared.read_text()}")
        finally:
            kill_all(procs)
    return codes, shared.read_text()


def _traceback_of(rank: int, text: str) -> list[str]:
    """Rank ``rank``'s traceback: its prefixed lines, checked to be one run
    of lines that no other output cuts into."""
    prefix = f"[rank{rank}]: "
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert at, f"rank {rank} wrote no prefixed traceback:\n{text}"
    assert at == list(range(at[0], at[-1] + 1)), f"rank {rank}'s traceback is cut:\n{text}"
    assert lines[at[0]] == prefix + "Traceback (most recent call last):", text
    return [lines[i][len(prefix) :] for i in at]


def _frames(traceback: list[str]) -> list[str]:
    """The files of the traceback's frames, in order ('syncdeco' for the
    package's own)."""
    files = [m[1] for line in traceback if (m := re.match(r'  File "(.+?)", line \d+', line))]
    return ["syncdeco" if f.startswith(str(SYNCDECO)) else Path(f).name for f in files]


def test_each_rank_prints_one_whole_prefixed_traceback_at_the_first_sync_point(
    tmp_path: Path,
) -> None:
    codes, text = _both_fail_at_the_first_sync_point(tmp_path)
    assert codes == [1, 1], text

    # Rank 0's own error: its call, syncdeco's one frame, its body, the error.
    own = _traceback_of(0, text)
    assert _frames(own) == ["first_failure.py", "syncdeco", "first_failure.py"], text
    assert own[2] == "    download_dataset()", text
    assert own[-1] == "ConnectionError: HTTP 503 from the dataset mirror", text

    # Rank 1 heard of it: its call, syncdeco's one frame, the error.
    heard = _traceback_of(1, text)
    assert _frames(heard) == ["first_failure.py", "syncdeco"], text
    assert heard[2] == "    download_dataset()", text
    assert heard[-1].startswith(
        "syncdeco.PeerFailedError: rank 0 raised ConnectionError: HTTP 503 from the "
        "dataset mirror (seen by rank 1 at main_first '__main__.download_dataset'"
    ), text
