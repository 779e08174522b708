"""Run a script (a torchrun job, an example) as a user would, in its own
session, so that a timeout kills it with every rank it started."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

# A test run under a launcher must not hand its own variables to the job.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_script(
    args: list[str],
    tmp_path: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> str:
    """Run ``args`` to the end and return its output (stdout and stderr);
    fail the test if it exits non-zero or runs past ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **(extra_env or {})}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Returns once every process holding stdout has closed it: Fabric's
        # rank 0 does not wait for the rank it started, but that rank holds it.
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{args} did not finish within {timeout}s")
    finally:
        try:  # nothing is left behind, even a rank that closed its stdout early
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text
