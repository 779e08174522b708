"""``python -m syncdeco where``: a real torchrun job of 4 Gloo ranks, hung
as jobs hang (tests/scripts/where_job.py), asked from outside as a user
asks; and the grouping, the text and the job finding, with plain values."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import docs_output
import pytest
import torch.distributed as dist
from scripted import LAUNCHER_VARIABLES, run_forked, start_script

from syncdeco.__main__ import main
from syncdeco._jobs import children, local_jobs
from syncdeco._plane.stacks import StackReport, SyncSeen, _format, who_key
from syncdeco._where import StoreJob, WhereError, choose, jobs_in
from syncdeco._where_text import as_data, format_where, group, parse_stack, rank_ranges

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "where_job.py"
WORLD = 4
START = 120.0  # seconds for torchrun and its ranks to start on a loaded machine


def _line_of(text: str) -> int:
    for number, line in enumerate(SCRIPT.read_text().splitlines(), 1):
        if line.strip().startswith(text):
            return number
    raise AssertionError(f"no line {text!r} in {SCRIPT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _where(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "syncdeco", "where", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _where_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``where`` in this process (the command's own ``main``, without
    Python's start): (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(["where", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _end_job(agent: subprocess.Popen, ranks: list[int]) -> None:
    """Kill the job's ranks (torchrun starts each in a session of its own),
    then its agent, and reap it: nothing is left behind."""
    for pid in {*ranks, *children(agent.pid)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        agent.wait(timeout=60)  # it reaps its ranks and ends
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(agent.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    agent.wait()
    if agent.stdout is not None:
        agent.stdout.close()


@pytest.fixture
def hung_job(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int, dict[int, int]]]:
    """A 4-rank torchrun job, hung: (agent, store port, pid of each rank)."""
    port = _free_port()
    agent = start_script([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--master-port", str(port), str(SCRIPT), str(tmp_path),
    ], extra_env={"PYTHONPATH": str(ROOT)})  # fmt: skip
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + START
        while len(pids) < WORLD:
            for rank in range(WORLD):
                ready = tmp_path / f"ready-{rank}"
                if rank not in pids and ready.exists() and ready.read_text():
                    pids[rank] = int(ready.read_text())
            if agent.poll() is not None:
                out = agent.stdout.read().decode() if agent.stdout else ""
                pytest.fail(f"the job ended before all its ranks were ready:\n{out}")
            if time.monotonic() > deadline:
                pytest.fail(f"only ranks {sorted(pids)} were ready within {START:g}s")
            time.sleep(0.05)
        yield agent, port, pids
    finally:
        _end_job(agent, list(pids.values()))


def _groups(out: str) -> dict[str, list[str]]:
    """The groups of ``where``'s text: title -> the lines below it."""
    found: dict[str, list[str]] = {}
    for block in out.strip().split("\n\n")[1:]:
        title, *lines = block.splitlines()
        found[title] = lines
    return found


def test_where_shows_each_rank_of_a_hung_torchrun_job_then_says_it_ended(
    hung_job: tuple[subprocess.Popen, int, dict[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    agent, port, pids = hung_job
    host = socket.gethostname()
    reduce_line, shard_line = _line_of("dist.all_reduce(grads)"), _line_of("time.sleep(0.05)")
    start_line = _line_of('sd.barrier("start")')
    stuck = f"ranks 0-2: all_reduce in where_job.py:{reduce_line} (step)"
    alone = f"rank 3: read_shard in where_job.py:{shard_line}"
    # A rank writes its file just before its last call: ask until each is in
    # it (a rank may also be caught in path.exists(), between two sleeps).
    deadline = time.monotonic() + 60
    while True:
        done = _where("--pid", str(pids[0]))
        assert done.returncode == 0, done.stderr
        groups = _groups(done.stdout)
        if set(groups) == {stuck, alone} or time.monotonic() > deadline:
            break
    assert set(groups) == {stuck, alone}, done.stdout
    heading = done.stdout.splitlines()[0]
    assert heading.startswith(f"torchrun job at 127.0.0.1:{port}: 4 ranks, 4 answered (")
    passed = f"last passed barrier 'start' (call 1, {SCRIPT.name}:{start_line})"
    for title, ranks in ((stuck, (0, 1, 2)), (alone, (3,))):
        lines = groups[title]
        for rank in ranks:
            (line,) = [ln for ln in lines if ln.startswith(f"  rank {rank}:")]
            assert line.startswith(f"  rank {rank}: host {host}, pid {pids[rank]}, {passed} "), line
            assert line.endswith(" ago"), line
        stack = lines[lines.index(next(ln for ln in lines if "stack," in ln)) + 1 :]
        innermost = f"{SCRIPT}:{reduce_line if rank != 3 else shard_line} in "
        assert stack[0].startswith(f"    {innermost}"), lines  # innermost user frame first
        assert stack[-1].startswith(f"    {SCRIPT}:") and "in <module>" in stack[-1], lines
    assert "frame(s) inside it not shown" in groups[stuck][-3], groups[stuck]
    shown = done.stdout.replace(f"host {host},", "host node0,")
    docs_output.check("python -m syncdeco where (tests/scripts/where_job.py)", shown)

    # The same as data (here and below, the command's main in this process:
    # the first and the last ask run the command itself).
    code, out, err = _where_here(capsys, "--pid", str(pids[1]), "--json")
    assert code == 0, err
    found = json.loads(out)
    assert [r["pid"] for r in found["ranks"]] == [pids[r] for r in range(WORLD)]
    assert {tuple(g["ranks"]) for g in found["groups"]} == {(0, 1, 2), (3,)}
    assert all(r["sync_point"]["inside"] is False for r in found["ranks"])

    # A stopped rank is silent: named, with where it was last seen.
    os.kill(pids[3], signal.SIGSTOP)
    code, out, err = _where_here(capsys, "--store", f"127.0.0.1:{port}")
    assert code == 0, err
    groups = _groups(out)
    (title,) = [t for t in groups if t.startswith("rank 3: silent")]
    assert "did not answer within 2 s: its process is stopped" in title, title
    (line,) = groups[title]
    assert line.startswith(f"  rank 3: host {host}, pid {pids[3]}, last seen "), line
    assert f"ago: read_shard in where_job.py:{shard_line}; {passed}" in line, line
    assert stuck in groups, out

    # Once the job has ended, `where` says so and fails.
    _end_job(agent, list(pids.values()))
    code, out, err = _where_here(capsys, "--pid", str(pids[0]))
    assert code == 1, out
    assert f"process {pids[0]} has ended" in err, err
    gone = _where("--store", f"127.0.0.1:{port}")
    assert gone.returncode == 1, gone
    assert f"nothing answers at 127.0.0.1:{port}" in gone.stderr, gone.stderr
    assert "the job has ended" in gone.stderr, gone.stderr


# -- the grouping and the text, with plain values ----------------------------------

USER = "/home/me/project"
TORCH = "/usr/lib/python3.11/site-packages/torch/distributed"


def _stack(*frames: tuple[str, int, str]) -> str:
    return _format([(f, n, fn, f"source of {fn}") for f, n, fn in frames], len(frames))


def _reduce(rank: int, *, line: int = 88) -> StackReport:
    frames = [
        (f"{USER}/train.py", 120, "<module>"),
        (f"{USER}/train.py", line, "step"),
        (f"{TORCH}/c10d_logger.py", 81, "wrapper"),
        (f"{TORCH}/distributed_c10d.py", 2950, "all_reduce"),
    ]
    return StackReport(
        rank,
        stack=_stack(*frames),
        frame=frames[1],
        host=f"node{rank // 8}",
        pid=1000 + rank,
        sync=SyncSeen("barrier 'epoch' (call 3, train.py:70)", 12.5, False),
    )


def _shard(rank: int) -> StackReport:
    frames = [(f"{USER}/train.py", 120, "<module>"), (f"{USER}/data.py", 31, "read_shard")]
    return StackReport(rank, stack=_stack(*frames), frame=frames[1], host="node0", pid=1007)


def test_rank_ranges() -> None:
    assert rank_ranges([]) == ""
    assert rank_ranges([3]) == "3"
    assert rank_ranges([8, 0, 1, 2, 4, 6, 7, 2]) == "0-2, 4, 6-8"


def test_ranks_with_the_same_stack_form_one_group_headed_by_what_they_called() -> None:
    reports = {r: _reduce(r) for r in range(16) if r != 7} | {7: _shard(7)}
    titles = [g.title for g in group(reports)]
    assert titles == [
        "ranks 0-6, 8-15: all_reduce in train.py:88 (step)",
        "rank 7: read_shard in data.py:31",
    ]
    text = format_where(reports, heading="job j")
    assert "  rank 9: host node1, pid 1009, last passed barrier 'epoch' (call 3, " in text
    assert "train.py:70) 12s ago\n" in text
    assert "  rank 7: host node0, pid 1007, no sync point passed yet\n" in text
    # innermost user frame first, the library's frames inside it left out
    assert (
        "  stack, innermost user frame first (2 frame(s) inside it not shown):\n"
        f"    {USER}/train.py:88 in step: source of step\n"
        f"    {USER}/train.py:120 in <module>: source of <module>\n"
    ) in text


def test_a_different_line_is_a_different_group() -> None:
    reports = {0: _reduce(0), 1: _reduce(1, line=90), 2: _reduce(2)}
    assert [g.ranks for g in group(reports)] == [[0, 2], [1]]


def test_a_rank_inside_a_sync_point_is_headed_by_it() -> None:
    frames = [(f"{USER}/train.py", 40, "main"), ("/x/syncdeco/_decorate.py", 10, "barrier")]
    inside = StackReport(
        0,
        stack=_stack(*frames),
        frame=frames[0],
        in_syncdeco=True,
        host="h",
        pid=1,
        sync=SyncSeen("barrier 'end' (call 1, train.py:40)", 3.25, True),
    )
    (g,) = group({0: inside})
    assert g.title == "rank 0: barrier 'end' (call 1, train.py:40), in train.py:40 (main)"
    assert "rank 0: host h, pid 1, in barrier 'end' (call 1, train.py:40) for 3.2s" in (
        format_where({0: inside}, heading="j")
    )


def test_syncdecos_wrapper_frames_are_left_out_of_a_groups_stack() -> None:
    # rank 0 is in a function that a decorated step calls: the decorator's
    # frame sits between the user's two
    frames = [
        (f"{USER}/train.py", 120, "<module>"),
        ("/x/site-packages/syncdeco/_decorate.py", 114, "call"),
        (f"{USER}/train.py", 60, "train_step"),
        (f"{USER}/data.py", 31, "read_shard"),
    ]
    report = StackReport(0, stack=_stack(*frames), frame=frames[3], host="h", pid=1)
    (g,) = group({0: report})
    assert [f[2] for f in g.stack] == ["read_shard", "train_step", "<module>"]
    assert g.wrappers == 1 and g.hidden == 0
    text = format_where({0: report}, heading="j")
    assert "  stack, innermost user frame first (1 of syncdeco's not shown):\n" in text
    assert "_decorate.py" not in text


def test_silent_exited_and_unstarted_ranks_are_said_so() -> None:
    silent = StackReport(2, host="h", pid=5, reason="did not answer within 2 s: it is stopped")
    reports = {
        0: _shard(0),
        1: StackReport(1, reason="has no stack responder: not started"),
        2: silent,
        3: StackReport(3, host="h", pid=6, reason="has exited", ended=True),
        4: StackReport(4, host="h", pid=7, reason="has exited", ended=True),
    }
    last = {2: StackReport(2, stack=_shard(2).stack, frame=_shard(2).frame, age=14.0)}
    text = format_where(reports, heading="j", last=last)
    never = format_where({2: silent}, heading="j", last={2: StackReport(2, age=90.0)})
    assert "rank 2: host h, pid 5, last seen 90s ago, at its first syncdeco sync point" in never
    titles = [g.title for g in group(reports)]
    assert titles == [
        "rank 0: read_shard in data.py:31",
        "rank 1: has no stack responder: not started",
        "rank 2: silent: did not answer within 2 s: it is stopped",
        "ranks 3-4: exited",
    ]
    assert (
        "  rank 2: host h, pid 5, last seen 14s ago: read_shard in data.py:31; "
        "no sync point passed yet\n"
    ) in text
    data = json.loads(json.dumps(as_data(reports, job="j", store="s", took=0.1, asked_at=0.0)))
    assert [g["ranks"] for g in data["groups"]] == [[0], [1], [2], [3, 4]]
    assert data["ranks"][3]["ended"] is True


def test_parse_stack_reads_what_a_rank_sends() -> None:
    text = (
        "Most recent call last:\n  ... 3 outer frame(s) left out\n"
        + _stack(("/a/b.py", 3, "f"), ("/a/c.py", 4, "g")).split("\n", 1)[1]
    )
    assert parse_stack(text) == [
        ("/a/b.py", 3, "f", "source of f"),
        ("/a/c.py", 4, "g", "source of g"),
    ]


# -- finding the job ----------------------------------------------------------------


def test_local_jobs_are_read_from_proc_leaving_out_the_ranks_children(tmp_path: Path) -> None:
    def process(pid: int, parent: int, **env: str) -> None:
        folder = tmp_path / str(pid)
        folder.mkdir()
        (folder / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()))
        (folder / "stat").write_text(f"{pid} (python) S {parent} 0 0")

    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    run = {"TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "0"}
    process(10, 1, RANK="0", LOCAL_RANK="0", **job, **run)
    process(11, 1, RANK="1", LOCAL_RANK="1", **job, **run)
    process(12, 10, RANK="0", LOCAL_RANK="0", **job, **run)  # rank 0's DataLoader worker
    process(13, 1, RANK="0", WORLD_SIZE="1")  # a job of one: nothing to ask
    process(14, 1, HOME="/root")
    process(20, 1, RANK="0", **{**job, "MASTER_PORT": "29600"})  # another job
    # ranks started through a wrapper (srun ./run.sh, `timeout 600 python x.py`)
    srun = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "MASTER_ADDR": "n0", "MASTER_PORT": "29700"}
    process(30, 1, SLURM_PROCID="0", **srun)  # the shell
    process(31, 30, SLURM_PROCID="0", **srun)  # python, the rank
    process(32, 31, SLURM_PROCID="0", **srun)  # its DataLoader worker
    process(33, 1, SLURM_PROCID="1", **srun)  # rank 1, started directly
    (a, b, c) = local_jobs(tmp_path)
    assert (a.id, a.addr, a.port, [r.pid for r in a.ranks]) == ("abc", "n0", 29500, [10, 11])
    assert [r.pids for r in a.ranks] == [{10, 12}, {11}]
    assert (b.id, b.port, [r.rank for r in b.ranks]) == ("n0:29600", 29600, [0])
    assert [(r.rank, r.pid, r.pids) for r in c.ranks] == [(0, 30, {30, 31, 32}), (1, 33, {33})]


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    yield dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)


def _responder_said(
    store: dist.TCPStore, prefix: str, rank: int, pid: int, *, off: bool = False
) -> None:
    import pickle

    store.set(who_key(prefix, rank), pickle.dumps(("h", pid, None, 2, 0.0)))
    store.append(f"{prefix}/started", f"{rank},")
    if off:
        store.set(f"{prefix}/{rank}/off", b"")


def test_jobs_in_a_store_are_found_under_any_prefix(store: dist.TCPStore) -> None:
    run = "syncdeco-job/TORCHELASTIC_RUN_ID=r,TORCHELASTIC_RESTART_COUNT="
    old, new = f"{run}0//syncdeco/stack", f"{run}1//syncdeco/stack"  # a restarted job
    for rank in range(2):
        _responder_said(store, old, rank, 10 + rank, off=True)
        _responder_said(store, new, rank, 20 + rank)
    store.set(f"{run}1//syncdeco/w/0/3", b"x")  # other keys are no job
    jobs = jobs_in(store, "s")
    assert [(j.prefix, j.running, j.world_size) for j in jobs] == [(old, [], 2), (new, [0, 1], 2)]
    assert choose(jobs, "s").prefix == new  # the one that still runs
    assert choose(jobs, "s", job="COUNT=0").prefix == old
    with pytest.raises(WhereError, match="matches --job 'attempt_9'"):
        choose(jobs, "s", job="attempt_9")
    with pytest.raises(WhereError, match="have not reached one yet"):
        choose([], "s")


def test_two_running_jobs_in_one_store_are_listed_to_pick_from() -> None:
    said = {0: ("h", 1, None, 1, 0.0)}
    jobs = [
        StoreJob("s", "a/syncdeco/stack", said, frozenset()),
        StoreJob("s", "b", said, frozenset()),
    ]
    with pytest.raises(WhereError, match="several jobs") as caught:
        choose(jobs, "s")
    assert "  a: 1 ranks, 1 running\n  b: 1 ranks, 1 running" in str(caught.value)


def test_a_ranks_responder_is_found_under_its_wrapper() -> None:
    # `srun ./run.sh`: the outermost process with the rank's variables is the
    # shell; the responder runs in the python under it
    import socket

    from syncdeco._jobs import LocalJob, LocalRank

    here = socket.gethostname()
    local = LocalJob("7.0", "SLURM", "n0", 29700, 2, "r", (LocalRank(30, 0, 1, frozenset({31})),))
    said = {0: (here, 31, None, 2, 0.0), 1: ("other", 40, None, 2, 0.0)}
    job = StoreJob("s", "p/syncdeco/stack", said, frozenset())
    assert choose([job], "s", local=local) is job
    alone = LocalJob("7.0", "SLURM", "n0", 29700, 2, "r", (LocalRank(30, 0, 1),))
    with pytest.raises(WhereError, match=r"rank 0 \(pid 30\), have not said"):
        choose([job], "s", local=alone)


def test_a_silent_ranks_last_sighting_is_aged_to_now() -> None:
    # its last answer, 14 s old, said it had passed 'epoch' 5 s before; or
    # that it was then inside it for 5 s
    silent = StackReport(2, host="h", pid=5, reason="did not answer within 2 s: it is stopped")
    for inside, said in (
        (False, "last passed barrier 'epoch' 19s ago"),
        (True, "then in barrier 'epoch' for 5.0s"),
    ):
        sync = SyncSeen("barrier 'epoch'", 5.0, inside)
        last = StackReport(2, stack=_shard(2).stack, frame=_shard(2).frame, age=14.0, sync=sync)
        text = format_where({2: silent}, heading="j", last={2: last})
        assert f"last seen 14s ago: read_shard in data.py:31; {said}\n" in text, text


def test_a_responder_reads_the_sync_point_its_exchange_is_in_or_last_passed() -> None:
    from types import SimpleNamespace

    from syncdeco._backend import SyncPoint
    from syncdeco._plane.stacks import sync_state

    point = SyncPoint("barrier", "epoch", 3, "train.py:70")
    now = time.monotonic()
    made = SimpleNamespace(at=None, passed=None)
    assert sync_state(lambda: made) is None
    made.passed = (point, now - 5.0)
    seen = sync_state(lambda: made)
    assert seen is not None and not seen.inside and seen.seconds >= 5.0
    assert seen.point == "barrier 'epoch' (call 3, train.py:70)"
    made.at = (point, now - 1.0)
    seen = sync_state(lambda: made)
    assert seen is not None and seen.inside and 1.0 <= seen.seconds < 5.0
    assert sync_state(lambda: None) is None  # its exchange is gone


def test_the_where_benchmark_runs(tmp_path: Path) -> None:
    # forked from the zygote (torch imported once), as `python benchmarks/where.py --smoke`
    bench = ROOT / "benchmarks" / "where.py"
    out = run_forked([str(bench), "--smoke"], tmp_path, {"PYTHONPATH": str(ROOT)}, timeout=300)
    (row,) = [ln.split() for ln in out.splitlines() if ln.split()[:1] == ["16"]]
    # requests per query: the asker's (one a rank and a few), the responders'
    # (7 a rank, some of which may come after the count is read; under load
    # also the wait each goes back to, and a responder's first check and
    # wait where it had not reached them when the count began: 164 seen
    # once at load 5).  A responder that polled would send hundreds each.
    assert int(row[-3]) > 16 and 5 * 16 <= int(row[-2]) <= 12 * 16, out
