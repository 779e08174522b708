"""The first sync point of a job with no process group yet keeps every
promise the later ones keep: its timeout, the ranks it names, an exit heard
within about a second.

Nothing here creates the group before the program does: the ranks are
started by the real torchrun, or as plain processes with a launcher's
variables (torchrun's with an agent's store that this test hosts, torchrun's
set by hand so that rank 0 hosts the store, SLURM's, Open MPI's), running
``tests/scripts/startup.py``; the harness's ``init=False`` and the
``ranks`` marker's do the same.  Each run has its own bound, and every
process a run started is killed with its session when the run ends.

The real torchrun's ranks are fresh interpreters (its agent is forked from
the zygote: ``scripted.start_torchrun``).  Plain-process ranks are
forked from a zygote that has imported torch and syncdeco (``zygote.py``:
two seconds of CPU saved per rank), and end through the interpreter's own
exit; the pairs in ``FRESH`` start fresh interpreters instead, so that every
scenario family and every way of ending runs at least once in ranks that
start as a launched script does (``test_every_launch...`` checks it).

The bounds on how soon an error comes are about detection, not speed: the
waits they are set against are 30 minutes (torch's rendezvous) or the
survivors' 60 s timeout.  ``SLACK`` is what a loaded 2-core machine may
add: 10 s, well below the waits a bound tells apart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import zygote
from scripted import LAUNCHER_VARIABLES, start_torchrun

import syncdeco as sd
from syncdeco.testing import launcher_env, run_ranks

SCRIPT = Path(__file__).parent / "scripts" / "startup.py"
SLACK = 10.0  # seconds a loaded machine may add to a bound: far below the 60 s it tells apart
RUN_BOUND = 90.0  # seconds one run of the script may take in all

# How the ranks of a run are started: the real torchrun, or plain processes
# with the variables of torchrun (its agent hosting the store, or rank 0
# hosting it when RANK and WORLD_SIZE are set by hand), SLURM or Open MPI.
LAUNCHES = ["torchrun", "torchrun-agent", "torchrun-by-hand", "slurm", "ompi"]
# ... those where rank 0 hosts the store
RANK0_HOSTS = {"torchrun-by-hand", "slurm", "ompi"}

# syncdeco's first sync point takes one of two paths (syncdeco/_startup.py):
# a launcher's agent hosts the store (torchrun's agent store), or rank 0
# hosts it (SLURM, Open MPI, torchrun's variables set by hand); the three
# launches of the second path differ only in the variables read, which the
# bare harness runs below (and tests/test_env.py) cover.  Each run here
# starts three Python processes that import torch (seconds each on 2
# cores), so a scenario runs under the real torchrun and under each path,
# not under every launch: every launch still starts real processes in some
# scenario, and every way of ending runs under both paths.
AGENT_AND_RANK0 = {
    "late": ["torchrun", "slurm"],
    "main_exits": ["torchrun", "torchrun-by-hand"],
    "kill": ["torchrun-agent", "slurm"],
    "tensor": ["torchrun", "ompi"],
    "slow_main": ["torchrun", "slurm"],
}
EXITS = [
    ("exit", "torchrun"),
    ("composition", "torchrun"),
    # torchrun's agent stops the others when a rank fails: the agent's
    # path for an uncaught exception is tested with this test's own store
    ("raise", "torchrun-agent"),
    ("exit", "ompi"),
    ("raise", "slurm"),
    ("composition", "torchrun-by-hand"),
]
# (scenario, launch) whose plain-process ranks are fresh interpreters, not
# forked from the zygote: the families and ways of ending that the real
# torchrun does not run ("kill"; "exits" with "raise").
FRESH = {("kill", "slurm"), ("exits", "slurm")}


def test_every_launch_and_every_way_of_ending_is_run() -> None:
    # The matrix above is cut to the two paths; it must not lose a launch, or
    # a way of ending on either path, when it is edited.
    used = {launch for launches in AGENT_AND_RANK0.values() for launch in launches}
    assert used | {launch for _, launch in EXITS} == set(LAUNCHES)
    for launches in AGENT_AND_RANK0.values():
        assert {launch in RANK0_HOSTS for launch in launches} == {True, False}, launches
    for how in ("exit", "raise", "composition"):
        paths = {launch in RANK0_HOSTS for way, launch in EXITS if way == how}
        assert paths == {True, False}, how
    # ... and each family and each way of ending runs in fresh interpreters
    for family, launches in AGENT_AND_RANK0.items():
        scenario = "exits" if family == "main_exits" else family
        assert any(_fresh(scenario, launch) for launch in launches), family
    for how in ("exit", "raise", "composition"):
        assert any(_fresh("exits", launch) for way, launch in EXITS if way == how), how


def _fresh(scenario: str, launch: str) -> bool:
    """Whether the ranks of ``scenario`` under ``launch`` start as fresh
    interpreters (the real torchrun's always do)."""
    return launch == "torchrun" or (scenario, launch) in FRESH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **(extra or {})}
    for key in (*LAUNCHER_VARIABLES, "TORCHELASTIC_USE_AGENT_STORE", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


Proc = subprocess.Popen[bytes] | zygote.Forked


def _finish(procs: Sequence[Proc], what: str) -> list[tuple[int, str]]:
    """Each process's exit status and output, within RUN_BOUND seconds in
    all; kills every process the run started, in its session, at the end."""
    results: list[tuple[int, str]] = []
    deadline = time.monotonic() + RUN_BOUND
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                for each in procs:
                    _kill(each)
                logs = [each.communicate()[0].decode(errors="replace") for each in procs]
                pytest.fail(f"{what}: did not finish within {RUN_BOUND}s:\n" + "\n".join(logs))
            assert proc.returncode is not None
            results.append((proc.returncode, out.decode(errors="replace")))
    finally:
        for proc in procs:
            _kill(proc)
            proc.wait()
    return results


def _kill(proc: Proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _records(tmp_path: Path, ranks: list[int], log: object) -> dict[int, dict[str, Any]]:
    found = {}
    for rank in ranks:
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no record:\n{log}"
        found[rank] = json.loads(path.read_text())
    return found


def run(
    launch: str,
    scenario: str,
    world_size: int,
    tmp_path: Path,
    arg: str = "",
    per_node: int | None = None,
    env: Mapping[str, str] | None = None,
    torchrun_args: tuple[str, ...] = (),
) -> list[tuple[int, str]]:
    """Run the script's ``scenario`` on ``world_size`` ranks started by
    ``launch``; returns each process's (exit status, output): one for the
    real torchrun (its agent), else one per rank."""
    per_node = per_node or world_size
    base = _base_env(tmp_path, env)
    command = [str(SCRIPT), scenario, str(tmp_path), *([arg] if arg else [])]
    port = _free_port()
    if launch == "torchrun":
        agent = [
            "--nnodes", "1", "--nproc-per-node", str(world_size),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *torchrun_args,
        ]  # fmt: skip
        return _finish([start_torchrun([*agent, *command], base)], f"torchrun {scenario} {arg}")
    store = None
    if launch == "torchrun-agent":
        # what torchrun's agent does: it hosts the store, every rank is a client
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False
        )
        port = store.port
    launcher = "torchrun" if launch.startswith("torchrun") else launch
    procs: list[Proc] = []
    for rank in range(world_size):
        variables = launcher_env(launcher, rank, world_size, per_node)  # type: ignore[arg-type]
        if launch == "torchrun-agent":
            variables.update(TORCHELASTIC_RUN_ID="test", TORCHELASTIC_RESTART_COUNT="0")
        elif launch == "torchrun-by-hand":
            variables.pop("TORCHELASTIC_USE_AGENT_STORE")
        rank_env = {**base, **variables, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if _fresh(scenario, launch):
            procs.append(
                subprocess.Popen(
                    [sys.executable, *command],
                    env=rank_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        else:
            procs.append(zygote.spawn(command, rank_env))
    try:
        return _finish(procs, f"{launch} {scenario} {arg}")
    finally:
        del store


def _ok(results: list[tuple[int, str]]) -> str:
    log = "\n".join(f"--- exit status {code} ---\n{out}" for code, out in results)
    assert all(code == 0 for code, _ in results), log
    return log


@pytest.mark.parametrize("launch", AGENT_AND_RANK0["late"])
def test_a_late_rank_is_named_at_the_first_sync_points_timeout(launch: str, tmp_path: Path) -> None:
    timeout = 4.0  # a member may come up to this much later than the main
    log = _ok(run(launch, "late", 3, tmp_path, arg=str(timeout)))
    rec = _records(tmp_path, [0, 1, 2], log)
    for rank in (0, 2):
        got = rec[rank]
        assert got["error"] == "SyncTimeoutError", (rank, got, log)
        assert got["missing"] == [1], (rank, got)
        assert got["elapsed"] <= timeout + SLACK, (rank, got)
        assert not got["group_after"], (rank, got)  # a failed first sync point makes no group
    assert rec[0]["elapsed"] >= timeout, rec[0]
    assert "but rank(s) 1 did not arrive: rank 1 (never seen at a sync point)" in rec[0]["message"]
    assert "call sd.init() at the start of every rank" in rec[0]["message"], rec[0]
    # The late rank, once the others are done, hears that it came too late.
    late = rec[1]
    assert late["waited_for_others"], late
    assert late["error"] == "SyncTimeoutError" and late["missing"] == [1], late
    assert "rank 1 reached barrier 'first'" in late["message"], late
    assert "too late" in late["message"], late


@pytest.mark.parametrize("launch", AGENT_AND_RANK0["slow_main"])
def test_a_main_still_in_its_first_main_first_body_is_located(launch: str, tmp_path: Path) -> None:
    # The main joins the job's store before its body (under torchrun's
    # agent store too): the others, giving up on it, can ask it where it is.
    log = _ok(run(launch, "slow_main", 2, tmp_path, arg="2"))
    rec = _records(tmp_path, [0, 1], log)
    member, main = rec[1], rec[0]
    assert member["error"] == "SyncTimeoutError" and member["missing"] == [0], member
    # (the innermost frame of the script's own: the body waits in wait_for)
    assert "rank 0 (never seen at a sync point) is in wait_for (" in member["message"], member
    assert "call sd.init()" not in member["message"], member  # it did say where it is
    assert main["error"] == "SyncTimeoutError" and "too late" in main["message"], main


@pytest.mark.parametrize(("how", "launch"), EXITS)
def test_a_member_that_ends_before_the_first_sync_point_is_named(
    launch: str, how: str, tmp_path: Path
) -> None:
    results = run(launch, "exits", 3, tmp_path, arg=f"1:{how}")
    log = "\n".join(out for _, out in results)
    if launch != "torchrun":
        assert [code for code, _ in results] == [0, 1 if how == "raise" else 0, 0], log
    rec = _records(tmp_path, [0, 2], log)
    for rank in (0, 2):
        got = rec[rank]
        assert got["error"] == "RankExitedError", (rank, got, log)
        assert got["named"] == 1, (rank, got)
        assert got["exc_type"] == ("OSError" if how == "raise" else ""), (rank, got)
        assert got["elapsed"] <= 2.0 + SLACK, (rank, got)  # the timeout is 60 s
        assert not got["group_after"], (rank, got)


@pytest.mark.parametrize("launch", AGENT_AND_RANK0["main_exits"])
def test_a_main_that_ends_before_the_first_sync_point(launch: str, tmp_path: Path) -> None:
    # Where the launcher's agent hosts the store, the main's exit notice is
    # read there: RankExitedError in about a second.  Where rank 0 hosts it,
    # the store ends with rank 0: the others cannot reach it, and at their
    # timeout they name rank 0 and say that it hosts the store.
    hosts = launch in RANK0_HOSTS
    timeout = 3.0 if hosts else 60.0
    results = run(launch, "exits", 3, tmp_path, arg="0:exit", env={"TIMEOUT": str(timeout)})
    log = _ok(results)
    rec = _records(tmp_path, [1, 2], log)
    for rank in (1, 2):
        got = rec[rank]
        if hosts:
            assert got["error"] == "SyncTimeoutError", (rank, got, log)
            assert got["missing"] == [0], (rank, got)
            assert "hosts the store at 127.0.0.1:" in got["message"], (rank, got)
            assert timeout <= got["elapsed"] <= timeout + SLACK, (rank, got)
        else:
            assert got["error"] == "RankExitedError", (rank, got, log)
            assert got["named"] == 0 and got["exc_type"] == "", (rank, got)
            assert got["elapsed"] <= 2.0 + SLACK, (rank, got)


@pytest.mark.parametrize("launch", AGENT_AND_RANK0["kill"])
def test_a_rank_killed_before_the_group_exists_is_named_at_the_timeout(
    launch: str, tmp_path: Path
) -> None:
    # No agent stops the others (as under srun without --kill-on-bad-exit):
    # a process killed by a signal says nothing; its absence is named at
    # the sync point's timeout (5 s), not at torch's rendezvous timeout.
    results = run(launch, "kill", 3, tmp_path)
    log = "\n".join(out for _, out in results)
    assert [code for code, _ in results] == [0, -signal.SIGKILL, 0], log
    rec = _records(tmp_path, [0, 2], log)
    for rank in (0, 2):
        got = rec[rank]
        assert got["error"] == "SyncTimeoutError", (rank, got, log)
        assert got["missing"] == [1], (rank, got)
        assert got["elapsed"] <= 5.0 + SLACK, (rank, got)


@pytest.mark.parametrize("launch", AGENT_AND_RANK0["tensor"])
def test_the_group_exists_after_the_first_sync_point_and_carries_tensors(
    launch: str, tmp_path: Path
) -> None:
    log = _ok(run(launch, "tensor", 2, tmp_path))
    rec = _records(tmp_path, [0, 1], log)
    for rank, got in rec.items():
        assert got["error"] is None, (rank, got, log)
        assert not got["group_before"] and got["group_after"], got
        grid = [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]]
        assert got["value"] == [grid, 7, "Tensor"], got
        assert got["second"] == [grid, 7, "Tensor"], got
        assert got["all_reduce"] == 3.0, got  # the group is the job's: 1 + 2
        assert (got["group_rank"], got["group_size"]) == (rank, 2), got
        assert got["after"]["error"] is None, got


@pytest.mark.parametrize("launch", ["torchrun", "slurm"])
def test_a_group_the_program_made_is_used_as_it_is(launch: str, tmp_path: Path) -> None:
    log = _ok(run(launch, "user_group", 2, tmp_path))
    for rank, got in _records(tmp_path, [0, 1], log).items():
        assert got["group_before"] and got["error"] is None, (rank, got, log)
        assert got["same_group"] and got["same_store"] and got["still_same_group"], got
        assert got["broadcast"] == [1.0, 1.0, 1.0], got


def test_a_local_first_sync_point_waits_for_its_node_only(tmp_path: Path) -> None:
    # Node 1 passes its local main_first before node 0 comes to its own: a
    # local sync point must not wait for the whole job, so it makes no group.
    # (With torchrun's agent store: where rank 0 hosts the store, every sync
    # point waits until rank 0 has come to its first one.)
    log = _ok(run("torchrun-agent", "local_first", 4, tmp_path, per_node=2))
    rec = _records(tmp_path, [0, 1, 2, 3], log)
    for rank in (0, 1):
        assert rec[rank]["node1_passed"], (rank, rec[rank], log)
    for rank, got in rec.items():
        assert got["error"] is None and not got["group_after"], (rank, got)
        assert got["world"]["error"] is None and got["world"]["group_after"], (rank, got)


def test_init_is_the_first_sync_point_and_names_a_late_rank(tmp_path: Path) -> None:
    timeout = 4.0  # a member may come up to this much later than the main
    log = _ok(run("slurm", "init_late", 2, tmp_path, arg=str(timeout)))
    rec = _records(tmp_path, [0, 1], log)
    assert rec[0]["error"] == "SyncTimeoutError" and rec[0]["missing"] == [1], (rec, log)
    assert timeout <= rec[0]["elapsed"] <= timeout + SLACK, rec[0]
    assert rec[1]["error"] == "SyncTimeoutError" and "too late" in rec[1]["message"], rec[1]


def test_a_restarted_torchrun_job_does_not_read_the_last_attempts_keys(tmp_path: Path) -> None:
    log = _ok(run("torchrun", "restart", 2, tmp_path, torchrun_args=("--max-restarts", "1")))
    for rank, got in _records(tmp_path, [0, 1], log).items():
        assert got["error"] is None and got["group_after"], (rank, got, log)


# -- the harness, started bare -------------------------------------------------


def _late_at_first(tmp: Path) -> tuple[str | None, tuple[int, ...], bool]:
    import time

    rank = sd.rank()
    assert not dist.is_initialized()
    if rank == 1:  # come only once the others have given up
        end = time.monotonic() + 20
        while not all((tmp / f"done{r}").exists() for r in (0, 2)) and time.monotonic() < end:
            time.sleep(0.01)
    elif rank == 2:  # a member comes after the main, so it hears the main's verdict
        end = time.monotonic() + 20
        while not (tmp / "entering0").exists() and time.monotonic() < end:
            time.sleep(0.01)
    else:
        (tmp / "entering0").write_text("")
    try:
        # (rank 2 must reach the store within it: on a loaded machine its
        # first connection took over 2 s in 2 runs of 27)
        sd.barrier("first", timeout=6)
    except sd.SyncTimeoutError as exc:
        outcome: tuple[str | None, tuple[int, ...], bool] = (
            type(exc).__name__,
            exc.missing,
            dist.is_initialized(),
        )
    else:
        outcome = (None, (), dist.is_initialized())
    (tmp / f"done{rank}").write_text("")
    end = time.monotonic() + 20  # rank 0 may host the store: it stays for the others
    while not all((tmp / f"done{r}").exists() for r in range(3)) and time.monotonic() < end:
        time.sleep(0.01)
    return outcome


@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "ompi"])
def test_run_ranks_without_init_starts_bare(launcher: str, tmp_path: Path) -> None:
    outcomes = run_ranks(_late_at_first, 3, tmp_path, init=False, launcher=launcher, timeout=60)  # type: ignore[arg-type]
    assert [o.unwrap() for o in outcomes] == [("SyncTimeoutError", (1,), False)] * 3


def _rank_one_fails_before_any_sync_point(tmp: Path) -> str:
    import time

    if sd.rank() == 1:
        # After the main is on its way (under SLURM's variables it hosts the
        # store that the exit notice goes to).
        end = time.monotonic() + 20
        while not (tmp / "entering0").exists() and time.monotonic() < end:
            time.sleep(0.01)
        raise ValueError("bad shard index 12")
    if sd.rank() == 0:
        (tmp / "entering0").write_text("")
    try:
        sd.barrier("first", timeout=60)
    except sd.RankExitedError as exc:
        outcome = f"{exc.rank} {exc.exc_type}: {exc.message}"
    else:
        outcome = "passed"
    (tmp / f"done{sd.rank()}").write_text("")
    if sd.rank() == 0:  # it may host the store: it stays until rank 2 has its verdict
        end = time.monotonic() + 20
        while not (tmp / "done2").exists() and time.monotonic() < end:
            time.sleep(0.01)
    return outcome


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_run_ranks_bare_a_rank_that_fails_before_the_first_sync_point(
    launcher: str, tmp_path: Path
) -> None:
    outcomes = run_ranks(
        _rank_one_fails_before_any_sync_point,
        3,
        tmp_path,
        init=False,
        launcher=launcher,  # type: ignore[arg-type]
        timeout=60,
    )
    assert isinstance(outcomes[1].error, ValueError), outcomes
    assert [outcomes[r].unwrap() for r in (0, 2)] == ["1 ValueError: bad shard index 12"] * 2


@pytest.mark.ranks(2, init=False, launcher="slurm", timeout=60)
def test_the_ranks_marker_starts_bare() -> None:
    assert not dist.is_initialized()
    sd.barrier("first", timeout=30)
    assert dist.is_initialized() and dist.get_world_size() == 2
