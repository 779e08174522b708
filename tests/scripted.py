"""Run a script (a torchrun job, an example) as a user would, in its own
session, so that a timeout kills it with every rank it started; or start
jobs that never end by themselves and read them until they have said enough."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import zygote

# A test run under a launcher must not hand its own variables to the job.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
_AGENT = Path(__file__).resolve().parent / "scripts" / "torchrun_agent.py"


def start_torchrun(
    args: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None = None
) -> zygote.Forked:
    """``torchrun ARGS``, its agent forked from the zygote: the agent runs
    torchrun's own code, and the ranks it starts are fresh interpreters, as
    under the ``torchrun`` command; only the agent's import of torch (about
    1.5 s of CPU a job) is shared.  In a session of its own."""
    return zygote.spawn([str(_AGENT), *args], env, cwd)


def _popen(args: list[str], env: Mapping[str, str], cwd: Path | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_script(
    args: list[str],
    tmp_path: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> str:
    """Run ``args`` to the end and return its output (stdout and stderr);
    fail the test if it exits non-zero or runs past ``timeout`` seconds.
    A torchrun command (``python -m torch.distributed.run``) runs through
    :func:`start_torchrun`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **(extra_env or {})}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    proc = start_torchrun(args[3:], env, cwd) if args[:3] == TORCHRUN else _popen(args, env, cwd)
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


def run_forked(
    args: list[str],
    tmp_path: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> str:
    """:func:`run_script` for ``python SCRIPT ARGS...`` (``args`` without the
    interpreter), with the process forked from the zygote (``zygote.py``)
    instead of started as a fresh interpreter: the same script as
    ``__main__``, environment, working directory and way of ending, without
    importing torch again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **(extra_env or {})}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    proc = zygote.spawn(args, env, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} did not finish within {timeout}s")
    finally:
        kill_all([proc])  # nothing is left behind, even a process it started
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def run_forked_ranks(
    args: list[str],
    nproc: int,
    tmp_path: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> str:
    """What ``torchrun --standalone --nproc-per-node NPROC SCRIPT ARGS...``
    does for a script's ranks, without torchrun's agent: this process hosts
    the store as the agent does, and each rank, forked from the zygote, gets
    the variables torchrun gives it.  Returns the ranks' output (stdout and
    stderr, rank by rank); fails the test if one exits non-zero or they run
    past ``timeout`` seconds in all.  The real torchrun's start is tested
    elsewhere (test_startup.py, test_torchrun.py, the examples)."""
    import torch.distributed as dist

    from syncdeco.testing import launcher_env

    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False
    )
    base = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **(extra_env or {})}
    for key in (*LAUNCHER_VARIABLES, "TORCHELASTIC_USE_AGENT_STORE", "LOCAL_WORLD_SIZE"):
        base.pop(key, None)
    procs: list[zygote.Forked] = []
    outputs: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(nproc):
            variables = {
                **launcher_env("torchrun", rank, nproc, nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "TORCHELASTIC_RUN_ID": "none",
                "TORCHELASTIC_RESTART_COUNT": "0",
                "TORCHELASTIC_MAX_RESTARTS": "0",
            }
            procs.append(zygote.spawn(args, {**base, **variables}, cwd))
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{args} on {nproc} ranks did not finish within {timeout}s")
            outputs.append(out.decode(errors="replace"))
    finally:
        kill_all(procs)  # each rank is its own session: killed with what it started
        del store
    text = "".join(outputs)
    assert [proc.returncode for proc in procs] == [0] * nproc, text
    return text


def start_script(args: list[str], extra_env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``args`` in a session of its own (see :func:`read_until`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so that it can be killed with every rank it started
    )


def read_until(
    procs: Sequence[subprocess.Popen], enough: Callable[[list[str]], bool], timeout: float
) -> list[str]:
    """The lines ``procs`` print, read until ``enough(lines)``; then every
    process they started is killed.  Fails the test at ``timeout`` seconds,
    or if they all end first.

    Each pipe is read with os.read, not readline: two ranks that print at the
    same instant can arrive in one chunk, and a line left in a file object's
    buffer is one that select() never reports."""
    lines: list[str] = []
    partial = {p.pid: b"" for p in procs}
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            for proc in procs:
                assert proc.stdout is not None
                sel.register(proc.stdout.fileno(), selectors.EVENT_READ, proc.pid)
            while not enough(lines):
                left = deadline - time.monotonic()
                events = sel.select(left) if left > 0 else []
                if not events:
                    pytest.fail(f"not said within {timeout}s; the output:\n" + "".join(lines))
                for key, _ in events:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        if not sel.get_map():
                            pytest.fail("ended before saying it; the output:\n" + "".join(lines))
                        continue
                    *done, partial[key.data] = (partial[key.data] + chunk).split(b"\n")
                    lines += [ln.decode(errors="replace") + "\n" for ln in done]
    finally:
        kill_all(procs)
    return lines


def kill_all(procs: Sequence[subprocess.Popen[Any] | zygote.Forked]) -> None:
    """Kill each of ``procs`` with every process of its session, and reap it."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        stdout = getattr(proc, "stdout", None)  # a zygote.Forked reads its own output
        if stdout is not None:
            stdout.close()
