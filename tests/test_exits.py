"""A rank whose process ends says so, and the ranks waiting for it raise
RankExitedError within about a second, at every sync point that needs it.

The ranks are plain processes with a launcher's variables but no agent:
nothing stops the others when one exits, as under srun without
--kill-on-bad-exit.  The survivors' sync points have a 300 s timeout and
each test 120 s, so a survivor that reports RankExitedError heard of the
exit, not of a timeout.

The ranks are forked from a zygote that has imported torch and syncdeco
(``zygote.py``: two seconds of CPU saved per rank); each runs the script as
``__main__`` and ends through the interpreter's own exit (the exception, the
atexit handlers, the threads' shutdown), which is what these tests are
about.  The scenarios in ``FRESH`` start fresh interpreters instead, one on
each path (torchrun's agent store; rank 0 hosting it under SLURM's
variables), so that an uncaught exception and a SIGKILL still end ranks
that started as a launched script does."""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import zygote
from scripted import kill_all

import syncdeco as sd
from syncdeco.testing import launcher_env, run_ranks

SCRIPT = Path(__file__).parent / "scripts" / "exits.py"
# (scenario, launcher) whose ranks are fresh interpreters, not forked
FRESH = {("member_raises", "torchrun"), ("killed_member", "slurm")}
BOUND = 120.0  # seconds one run may take in all


def _run(
    scenario: str, world_size: int, per_node: int, tmp_path: Path, launcher: str = "torchrun"
) -> dict[int, str]:
    """Each rank's exit status and output (without torch's own store log,
    which syncdeco cannot silence).  Under torchrun's variables the
    ranks are clients of a store this test hosts, as torchrun's agent hosts
    one; under SLURM's, rank 0 hosts it (syncdeco makes the group)."""
    if launcher == "torchrun":
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False
        )
        port = store.port
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    procs: list[subprocess.Popen[bytes] | zygote.Forked] = []
    for rank in range(world_size):
        env = {
            **os.environ,
            **launcher_env(launcher, rank, world_size, per_node),  # type: ignore[arg-type]
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": "0",
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(tmp_path),
            # These tests are about sync points: a rank killed while another
            # is not yet at one is heard at its next (fail-fast, on by
            # default, would end that rank instead: test_failfast.py).
            "SYNCDECO_FAIL_FAST": "0",
        }
        command = [str(SCRIPT), scenario, str(tmp_path)]
        if (scenario, launcher) in FRESH:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *command],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        else:
            procs.append(zygote.spawn(command, env))
    outputs: dict[int, str] = {}
    deadline = time.monotonic() + BOUND
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            # what the rank said, past torch's own store log (see _torch_log)
            said = [ln for ln in out.decode(errors="replace").splitlines() if not _torch_log(ln)]
            outputs[rank] = "".join(f"{ln}\n" for ln in [f"exit status {proc.returncode}", *said])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: ranks did not finish within {BOUND}s: {outputs}")
    finally:
        kill_all(procs)  # each rank is its own session: killed with what it started
    return outputs


def test_member_raising_outside_any_sync_point_is_named(tmp_path: Path) -> None:
    out = _run("member_raises", 3, 3, tmp_path)
    assert out[1].startswith("exit status 1\n") and "OSError: disk full" in out[1], out
    for rank in (0, 2):
        assert out[rank].startswith("exit status 0\n"), out
        for point in ("next", "again"):  # and at every sync point after
            assert (
                f"[rank {rank}] RankExitedError rank=1 exc_type='OSError': rank 1 exited "
                f"without reaching this sync point (seen by rank {rank} at barrier '{point}'"
            ) in out[rank], out
        assert "an uncaught OSError: disk full while writing shard 7 ended its process" in out[rank]


@pytest.mark.parametrize(
    ("scenario", "launcher", "victim"),
    [
        ("killed_member", "torchrun", 1),
        ("killed_main", "torchrun", 0),
        # rank 0 hosts the store (Open MPI's variables take the same path)
        ("killed_member", "slurm", 1),
        ("killed_local", "torchrun", 1),
        # in an atexit handler registered after `import syncdeco`, before
        # its first use: syncdeco's own exit handlers have not run yet
        ("killed_at_exit", "torchrun", 1),
    ],
)
def test_a_killed_rank_is_named_by_every_rank_waiting_with_no_timeout(
    scenario: str, launcher: str, victim: int, tmp_path: Path
) -> None:
    # timeout=None: without the death watch the survivors would wait forever
    # (the test's own bound, 120 s, would fail it).
    out = _run(scenario, 3, 3, tmp_path, launcher=launcher)
    assert out[victim] == "exit status -9\n", out
    for rank in {0, 1, 2} - {victim}:
        # 0, or -6 when Gloo's threads abort at interpreter teardown on a mesh
        # whose peer was killed ("terminate called without an active
        # exception"): torch's teardown, after the rank's program finished.
        status, line, *rest = out[rank].splitlines()
        assert (status == "exit status 0" and not rest) or (
            status == "exit status -6" and rest == ["terminate called without an active exception"]
        ), out
        assert line.startswith(f"[rank {rank}] RankKilledError rank={victim} within "), out
        took = float(line.split(" within ", 1)[1].split("s:", 1)[0])
        assert took < 5, out  # the promise: named within 5 s
        assert "ended without running Python's exit handlers" in line, out
        assert "SIGKILL or the out-of-memory killer" in line, out


def test_a_killed_node_main_is_named_at_a_local_sync_point_on_its_store(
    tmp_path: Path,
) -> None:
    # Two nodes of two ranks under SLURM's variables: rank 2, the second
    # node's main, hosts its node's store and dies with it; rank 3 meets it
    # at a local sync point with no timeout, on that store, or (1 run in 4)
    # cut off from it already.  Either way rank 3 names rank 2 at once, not
    # the job's store, and does not wait on the job's store for a main that
    # never answers there.
    out = _run("node_main_killed", 4, 2, tmp_path, launcher="slurm")
    assert out[2] == "exit status -9\n", out
    # -6 as in the test above: Gloo's teardown on a mesh whose peer was killed
    aborted = ["exit status -6", "terminate called without an active exception"]
    status, line, *rest = out[3].splitlines()
    assert (status == "exit status 0" and not rest) or [status, *rest] == aborted, out
    assert line.startswith("[rank 3] RankKilledError within "), out
    assert "rank 2 exited without reaching this sync point" in line, out
    assert "main_first 'node data'" in line, out
    took = float(line.split(" within ", 1)[1].split("s:", 1)[0])
    assert took < 5, out  # the promise: named within 5 s
    for rank in (0, 1):
        assert out[rank].splitlines() in (["exit status 0"], aborted), out


def test_a_node_hears_why_its_main_lost_the_jobs_store(tmp_path: Path) -> None:
    # Two nodes of two ranks under SLURM's variables: rank 0, which hosts
    # the job's store, is killed while rank 2 (the second node's main) waits
    # there for its verdict and rank 3 waits for rank 2's relay with no
    # timeout.  Rank 2 raises, and relays that to rank 3, which does not
    # wait for a relay that never comes (rank 2 stays, as a program that
    # caught the error would).
    out = _run("store_host_killed_with_tiers", 4, 2, tmp_path, launcher="slurm")
    assert out[0] == "exit status -9\n", out
    lost = "lost its connection to the process group's store"
    said = {r: out[r].splitlines() for r in (1, 2, 3)}
    # (-6: Gloo's teardown on a mesh whose peer was killed, as above)
    assert all(lines[0] in ("exit status 0", "exit status -6") for lines in said.values()), out
    line = said[2][1]
    assert line.startswith("[rank 2] SyncError: rank 2 at barrier 'after'") and lost in line, out
    line = said[3][1]
    assert line.startswith("[rank 3] PeerFailedError: rank 2 raised SyncError: "), out
    assert lost in line and "seen by rank 3 at barrier 'after'" in line, out


def test_main_whose_program_ended_is_named(tmp_path: Path) -> None:
    out = _run("main_returns", 3, 3, tmp_path)
    assert out[0] == "exit status 0\n", out
    for rank in (1, 2):
        assert f"[rank {rank}] RankExitedError rank=0 exc_type='': " in out[rank], out
        assert "its program ended without an uncaught exception" in out[rank], out


def test_exit_before_a_local_sync_point_reaches_that_node_only(tmp_path: Path) -> None:
    out = _run("local_member_exits", 4, 2, tmp_path)  # nodes {0, 1} and {2, 3}
    assert out[3] == "exit status 0\n", out
    assert "[rank 2] RankExitedError rank=3 exc_type=''" in out[2], out
    for rank in (0, 1):  # the other node's local sync point is complete
        assert f"[rank {rank}] passed next" in out[rank], out


def test_a_sync_point_in_an_atexit_handler_still_meets(tmp_path: Path) -> None:
    # The handler was registered after `import syncdeco`, so it runs before
    # syncdeco tells the others this rank is exiting.
    out = _run("sync_at_exit", 2, 2, tmp_path)
    for rank in (0, 1):
        assert out[rank] == f"exit status 0\n[rank {rank}] met at shutdown\n", out


def test_a_correct_program_whose_store_host_ends_first_exits_quietly(tmp_path: Path) -> None:
    # Under SLURM's variables rank 0 hosts the store; the others exit after
    # it is gone, and their exit notice must not fail loudly on it.
    out = _run("main_ends_first", 3, 3, tmp_path, launcher="slurm")
    assert out[0] == "exit status 0\n", out
    for rank in (1, 2):
        assert out[rank] == f"exit status 0\n[rank {rank}] exiting after rank 0\n", out


def _torch_log(line: str) -> bool:
    """Whether ``line`` is part of a warning of torch's C++ store code (a
    store wait that timed out; a client address it could not name, where
    the machine has no DNS): torch prints them, syncdeco cannot silence
    them at run time (docs/errors.md says so)."""
    return bool(
        re.match(r"(\[rank\d+\]:)?\[W\d{4} [\d:.]+ \S+\] \[c10d\]", line)
        or re.match(r"(frame #\d+: |Exception raised from |<omitting python frames>|$)", line)
    )


def test_under_slurm_a_stuck_rank_is_located_and_a_clean_end_is_quiet(tmp_path: Path) -> None:
    # Four ranks on two nodes under SLURM's variables (rank 0 hosts the
    # store, each node's main a store of its own): every rank answers a stack
    # request, so every rank that times out names the function rank 3 is
    # busy in; then rank 0 ends first, and no rank's store client logs.
    out = _run("stuck_then_main_ends_first", 4, 2, tmp_path, launcher="slurm")
    for rank in (0, 1, 2):
        status, *lines = out[rank].splitlines()
        assert status == "exit status 0", out
        (at,) = [i for i, ln in enumerate(lines) if ln.startswith(f"[rank {rank}] tier ")]
        assert lines[at].startswith(
            f"[rank {rank}] tier True; missing [3]; rank 3 is in load_batch ("
        ), out
        assert "exits.py:" in lines[at], out
        assert lines[at].endswith("its stack shows load_batch: True"), out
        # Before it, only torch's own warning of a store wait that timed out
        # (a node's main gathering its node until its deadline); after it,
        # the clean end: nothing but what the program says.
        assert all(_torch_log(ln) for ln in lines[:at]), out
        after = [] if rank == 0 else [f"[rank {rank}] exiting after rank 0"]
        assert lines[at + 1 :] == after, out
    # Rank 3 came late: its wait for its node's relay may outlast one of the
    # node's 4 s store waits, which torch logs; then only the clean end.
    status, *lines = out[3].splitlines()
    assert status == "exit status 0", out
    assert lines[-1:] == ["[rank 3] exiting after rank 0"], out
    assert all(_torch_log(ln) for ln in lines[:-1]), out


def test_a_main_waiting_for_a_slow_member_hears_of_an_exit(tmp_path: Path) -> None:
    out = _run("blocked_on_a_slow_member", 3, 3, tmp_path)
    for rank in (0, 1):
        assert f"[rank {rank}] RankExitedError rank=2 exc_type='OSError'" in out[rank], out


@pytest.mark.parametrize("scenario", ["daemon_member_waits", "daemon_main_waits"])
def test_an_exit_while_a_daemon_thread_waits_reaches_the_other_rank(
    scenario: str, tmp_path: Path
) -> None:
    # The daemon thread holds the exchange's store connection for its whole
    # wait (300 s): the exit notice must not queue behind it, and must reach
    # the sync point that thread is in, which it never finishes.
    out = _run(scenario, 2, 2, tmp_path)
    leaver = 1 if scenario == "daemon_member_waits" else 0
    stayer = 1 - leaver
    status, *said = out[stayer].splitlines()
    assert status == "exit status 0" and said[0] == f"[rank {stayer}] rank {leaver} has exited"
    exited = f"[rank {stayer}] RankExitedError rank={leaver} exc_type=''"
    if leaver == 1:
        # The member's frame was sent before its process ended: the sync
        # point its thread was in completes; the next one names it.
        assert said[1:3] == [f"[rank {stayer}] passed background", said[2]], out
        assert said[2].startswith(exited) and "barrier 'next'" in said[2], out
    else:
        # The main never answered: the member hears its exit at that sync
        # point, at once (not at its 300 s timeout), and at the next.
        assert said[1].startswith(exited) and "barrier 'background'" in said[1], out
        assert said[2].startswith(exited) and "barrier 'next'" in said[2], out
    # The leaver ended without waiting for its thread. Its status is 0, or -6
    # (SIGABRT) in about 1 run in 3: a daemon thread still blocked in a c10d
    # store call when the interpreter tears down aborts the process. That is
    # torch's teardown, not this notice.
    assert out[leaver] in (
        "exit status 0\n",
        "exit status -6\nterminate called without an active exception\n",
    ), out


def test_a_sync_point_after_the_store_host_exited(tmp_path: Path) -> None:
    # Rank 0 took the store with it: no exit notice can be read, and the
    # others must get a SyncError that says what happened, not a raw
    # network error from the store client (which logs its own warning).
    out = _run("store_host_gone", 3, 3, tmp_path, launcher="slurm")
    for rank in (1, 2):
        assert out[rank].startswith("exit status 0\n"), out
        assert (
            f"[rank {rank}] SyncError: rank {rank} at barrier 'next' (call 1, exits.py:"
        ) in out[rank], out
        assert "lost its connection to the process group's store" in out[rank], out


def _rank_one_fails_before_any_sync_point() -> str:
    if sd.rank() == 1:
        raise ValueError("bad shard index 12")
    try:
        sd.barrier("first")  # the default timeout: 30 minutes
    except sd.RankExitedError as exc:
        return f"{exc.rank} {exc.exc_type}: {exc.message}"
    return "passed"


def test_run_ranks_a_rank_that_fails_before_the_first_sync_point(tmp_path: Path) -> None:
    outcomes = run_ranks(_rank_one_fails_before_any_sync_point, 3, timeout=60)
    assert isinstance(outcomes[1].error, ValueError), outcomes
    assert [outcomes[r].unwrap() for r in (0, 2)] == ["1 ValueError: bad shard index 12"] * 2


def _forks_a_child_that_exits() -> str:
    assert sd.world_size() == 2  # syncdeco has seen the group
    pid = os.fork()  # before any sync point: an exit notice would be for #1
    if pid == 0:  # a child with its parent's group state: it must stay silent
        atexit._run_exitfuncs()  # what its interpreter's exit runs (sys.exit would
        os._exit(0)  # unwind into the harness here)
    os.waitpid(pid, 0)
    sd.barrier("after", timeout=60)
    return "passed"


def test_a_forked_child_exiting_says_nothing(tmp_path: Path) -> None:
    outcomes = run_ranks(_forks_a_child_that_exits, 2, timeout=60)
    assert [o.unwrap() for o in outcomes] == ["passed", "passed"]


def _sync_after_announcing_exit() -> str:
    from syncdeco._plane import group as backend

    sd.barrier("before")
    backend.announce_exit(None)  # what interpreter exit does
    try:
        sd.barrier("after")
    except sd.SyncError as exc:
        return str(exc)
    return "no error"


def test_a_sync_point_after_this_rank_announced_its_exit() -> None:
    for o in run_ranks(_sync_after_announcing_exit, 2, timeout=60):
        message = o.unwrap()
        assert message.startswith(f"rank {o.rank} at barrier 'after'"), message
        assert "already told the other ranks it is exiting" in message, message


class _Leaving:
    """A session's face to announce_exit: what it was told."""

    def __init__(self, told: list[tuple[str, BaseException | None]], name: str) -> None:
        self.told, self.name = told, name

    def leave(self, exc: BaseException | None) -> None:
        self.told.append((self.name, exc))


def test_an_exit_is_told_on_the_early_session_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # A main that made the group itself inside its first main_first body has
    # two sessions: the others wait for it over the early one's store.
    from syncdeco._plane import group

    told: list[tuple[str, BaseException | None]] = []
    early, current = _Leaving(told, "early"), _Leaving(told, "current")
    monkeypatch.setattr(group.SESSIONS, "early", early)
    monkeypatch.setattr(group.SESSIONS, "current", (lambda: None, current))
    error = ValueError("disk full")
    group.announce_exit(error)
    assert told == [("current", error), ("early", error)]
    told.clear()
    monkeypatch.setattr(group.SESSIONS, "current", (lambda: None, early))  # one and the same
    group.announce_exit(None)
    assert told == [("early", None)]
