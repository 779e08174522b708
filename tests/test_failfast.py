"""Fail-fast (syncdeco/_plane/failfast.py): a rank outside any sync point
ends, naming the lost ranks, when a peer is lost.

The rules are checked with plain values; the promises on real processes,
started as a launcher starts them (no group made in advance): ranks on one
host (tests/scripts/failfast_ranks.py), and two nodes in network namespaces
(tests/netns.py; skipped where namespaces are not allowed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docs_output
import netns
import pytest

import syncdeco as sd
from syncdeco._backend import Failure
from syncdeco._plane import failfast, lease, pulse
from syncdeco._plane.exits import killed_failure
from syncdeco._plane.nodewatch import lost_failure
from syncdeco.testing import launcher_env

RANKS = Path(__file__).parent / "scripts" / "failfast_ranks.py"
ENDED_WITHIN = 60.0  # seconds a test waits for a rank to end before it fails (no timing promise)

# -- the rules, with plain values ---------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "env", "on"),
    [
        (None, {}, True),
        (None, {"SYNCDECO_FAIL_FAST": ""}, True),
        (None, {"SYNCDECO_FAIL_FAST": "0"}, False),
        (None, {"SYNCDECO_FAIL_FAST": "off"}, False),
        (None, {"SYNCDECO_FAIL_FAST": " Yes "}, True),
        (True, {"SYNCDECO_FAIL_FAST": "0"}, True),
        (False, {"SYNCDECO_FAIL_FAST": "1"}, False),
    ],
)
def test_the_option_wins_over_the_variable_which_wins_over_the_default(
    option: bool | None, env: dict[str, str], on: bool
) -> None:
    assert failfast.enabled(option, env) is on


def test_a_bad_variable_says_what_to_set() -> None:
    with pytest.raises(ValueError, match=r"SYNCDECO_FAIL_FAST='maybe'.*fail_fast=True/False"):
        failfast.enabled(None, {"SYNCDECO_FAIL_FAST": "maybe"})


def test_init_takes_only_a_bool_or_none() -> None:
    with pytest.raises(TypeError, match="fail_fast"):
        sd.init("null", fail_fast="yes")  # type: ignore[arg-type]
    sd.init("null", fail_fast=False)
    from syncdeco._backend import _Config

    assert _Config.fail_fast is False


def test_a_clean_exit_is_no_loss_and_an_unnoted_end_is_a_kill() -> None:
    assert failfast.loss_from_note(3, "node0", {"how": "exit", "clean": True}) is None
    killed = failfast.loss_from_note(3, "node0", None)
    assert killed is not None and killed.ranks == (3,) and "SIGKILL" in killed.how
    raised = failfast.loss_from_note(
        3, "node0", {"how": "exit", "clean": False, "exc_type": "ValueError", "message": "bad\nx"}
    )
    assert raised == failfast.Loss((3,), "node0", "exited with ValueError: bad")


def test_a_rank_that_failed_fast_passes_the_original_loss_on() -> None:
    note = {"how": "fail-fast", "ranks": [2, 3], "host": "node1", "said": "were lost"}
    loss = failfast.loss_from_note(0, "node0", note)
    assert loss == failfast.Loss((2, 3), "node1", "were lost", (0, "node0"))
    assert failfast.message(1, [loss]).startswith(
        "syncdeco fail-fast: rank 1 ends with exit code 75: ranks 2 and 3 on node1 were lost "
        "(rank 0, on node0, heard it first and ended). "
    )


def test_a_loss_marked_on_a_lease_names_the_rank_that_heard_it_first_however_far() -> None:
    # Rank 0 (node0) heard it first and marked node1's lease; node1's main
    # (rank 4) hears it from its pulse and ends; rank 5 reads rank 4's note.
    note = {"how": "fail-fast", "ranks": [8], "host": "node2", "said": "was lost", "first": [0]}
    note["first"] = [0, "node0"]
    marked = failfast.loss_from_mark(json.dumps(note).encode())
    assert marked == failfast.Loss((8,), "node2", "was lost", (0, "node0"))
    passed = {**note}  # what rank 4 writes as it ends: the same loss, the same first rank
    assert failfast.loss_from_note(4, "node1", passed) == marked
    said = failfast.message(5, [marked])
    assert "rank 8 on node2 was lost (rank 0, on node0, heard it first and ended). " in said
    assert failfast.loss_from_mark(b"not json") is None
    assert failfast.loss_from_mark(b'{"how": "exit", "clean": true}') is None


def test_a_lost_node_and_a_killed_rank_as_losses() -> None:
    node = failfast.loss_from_failure(lost_failure(3, "node1", (2, 3)))
    assert (node.ranks, node.host) == ((2, 3), "node1") and "lost with their node" in node.how
    assert failfast.loss_from_failure(killed_failure(5)).ranks == (5,)
    alone = failfast.loss_from_failure(lost_failure(4, "node2", (4,)))
    assert alone.how.startswith("was lost with its node"), alone
    raised = Failure(4, "KeyError", "'x'", "", exited=True)
    assert failfast.loss_from_failure(raised).how == "exited with KeyError: 'x'"


def test_the_message_names_the_ranks_the_host_the_code_and_the_way_out() -> None:
    said = failfast.message(1, [failfast.Loss((2, 3), "node1", "were lost with their node")])
    assert said.startswith(
        "syncdeco fail-fast: rank 1 ends with exit code 75: ranks 2 and 3 on node1 were lost "
        "with their node."
    )
    assert "fail_fast=False" in said and "SYNCDECO_FAIL_FAST=0" in said
    assert "--max-restarts" in said


def test_losses_of_one_host_and_kind_are_named_together() -> None:
    losses = [failfast.loss_from_failure(lost_failure(r, "node1", (r,))) for r in (3, 2)]
    assert failfast._merge(losses) == [failfast.Loss((2, 3), "node1", losses[0].how)]


def _fresh_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's fail-fast state, reset for the test; the notes' base."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name, value in vars(failfast._State).copy().items():
        if not name.startswith("__") and name != "lock":
            monkeypatch.setattr(failfast._State, name, value)
    monkeypatch.setattr(failfast._State, "siblings", {})
    return tmp_path / f"syncdeco-notes-{os.getuid()}"


def test_a_clean_exit_leaves_a_note_in_each_inbox_and_takes_its_own_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _fresh_notes(tmp_path, monkeypatch)

    def be(rank: int) -> None:  # this process plays ranks 0 and 1 of one node in turn
        failfast.arm(rank, "store:1234 job", "node0/boot")

    be(0)
    be(1)
    (job,) = base.iterdir()
    assert sorted(p.name for p in job.iterdir()) == ["0", "1"]
    assert oct(job.stat().st_mode & 0o777) == oct((job / "1").stat().st_mode & 0o777) == "0o700"
    failfast.note_exit(SystemExit(0))  # rank 1 exits cleanly
    assert [p.name for p in job.iterdir()] == ["0"]
    be(0)
    note = failfast._read_note(1, os.getpid())
    assert note == {"how": "exit", "clean": True}
    assert failfast.loss_from_note(1, "node0", note) is None
    assert failfast._read_note(1, os.getpid()) is None  # read once
    failfast.note_exit(None)  # rank 0, the last one out
    assert not job.exists()


def test_the_last_rank_out_removes_a_killed_ranks_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _fresh_notes(tmp_path, monkeypatch)
    failfast.arm(1, "store:1234 job", "node0/boot")  # rank 1, later killed
    failfast.arm(0, "store:1234 job", "node0/boot")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that ended
    assert dead.wait(timeout=60) == 0
    failfast.watching(1, dead.pid)  # as the death watch does
    failfast.note_exit(None)  # rank 0 leaves
    assert list(base.iterdir()) == []  # the job's folder went with both inboxes


def _leave_at_once(base: Path, rank: int, go: int) -> None:
    """In a forked child: be ``rank`` of a node's job, wait for ``go`` (a
    pipe), and leave as a clean exit does."""
    code = 1
    try:
        failfast.arm(rank, "store:1234 job", "node0/boot")
        os.read(go, 1)
        failfast.note_exit(None)
        code = 0
    finally:
        os._exit(code)


def test_ranks_that_leave_at_once_leave_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each writes its note into the other's inbox as that one removes it:
    # the job's folder must still go, whoever is last (30 rounds of 3 ranks).
    base = _fresh_notes(tmp_path, monkeypatch)
    for _ in range(30):
        read, write = os.pipe()
        pids = []
        for rank in range(3):
            pid = os.fork()
            if pid == 0:
                _leave_at_once(base, rank, read)
            pids.append(pid)
        os.close(read)
        deadline = time.monotonic() + 30
        while not base.exists() or not all(
            (job / str(r)).exists() for job in base.iterdir() for r in range(3)
        ):  # until each has its inbox
            assert time.monotonic() < deadline, "the ranks did not make their inboxes"
            time.sleep(0.001)
        os.write(write, b"xxx")
        os.close(write)
        assert [os.waitpid(pid, 0)[1] for pid in pids] == [0, 0, 0]
        assert list(base.iterdir()) == [], list(base.rglob("*"))


class _Counting:
    """A store that counts the requests sent through it."""

    def __init__(self, store: object) -> None:
        self.store, self.sent = store, []

    def __getattr__(self, name: str):
        call = getattr(self.store, name)

        def counted(*args, **kwargs):
            self.sent.append(name)
            return call(*args, **kwargs)

        return counted


def test_the_store_host_waits_only_for_pulses_that_can_still_hear_the_mark() -> None:
    # Seen under torchrun: the rank whose end ends the store waited its whole
    # 2 s for the lost node's pulse (gone with its node), and the agent's
    # SIGTERM came first.
    readings = {
        "a": lease.read(lease.alive(1, "a", (0, 1))),
        "b": lease.read(lease.alive(4, "b", (2, 3))),  # lost: its pulse went with it
        "c": lease.read(lease.ended("c", (4,))),  # its ranks all ended: its pulse too
        "d": lease.read(lease.alive(9, "d", (5,))),
    }
    assert pulse.awaited(readings, (2, 3)) == ["a", "d"]
    assert pulse.awaited(readings, ()) == ["a", "b", "d"]
    note = json.dumps({"how": "fail-fast", "ranks": [2, 3], "host": "b", "said": "x"})
    assert failfast.lost_in(note.encode()) == (2, 3)
    assert failfast.lost_in(b"not a note") == ()


def test_the_loss_mark_takes_one_request_and_every_waiting_pulse_hears_it() -> None:
    """pulse.mark, pulse.listen and pulse.linger against a real TCPStore in
    this process (no rank: the store's answers are the rule's input)."""
    import threading

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store = dist.PrefixStore("job/", server)  # type: ignore[attr-defined]
    leases = {
        "a": lease.alive(1, "a", (0,)),  # this rank's node: not waited for
        "b": lease.alive(1, "b", (1,)),
        "c": lease.ended("c", (2,)),  # its ranks all ended: its pulse is gone
        "d": lease.alive(7, "d", (3,)),
    }
    for node, value in leases.items():
        store.set(pulse.lease_key(node), value)
        store.append(pulse.LIST, f"{node} 0\n")
    heard: dict[str, bytes] = {}
    listeners = {}
    for node in ("b", "d"):  # each pulse waits on a connection of its own
        own = dist.PrefixStore("job/", server.clone())  # type: ignore[attr-defined]
        told = (lambda n: lambda loss: heard.__setitem__(n, loss))(node)
        listeners[node] = threading.Thread(target=pulse.listen, args=(own, node, told))
        listeners[node].start()
    assert not pulse.linger(store, {"a"}, 0.0)  # nobody heard anything yet
    loss = json.dumps({"how": "fail-fast", "ranks": [9], "host": "e", "said": "x"}).encode()
    counting = _Counting(store)
    assert pulse.mark(counting, loss)
    assert counting.sent == ["compare_set"]  # one request, whatever the number of nodes
    assert not pulse.mark(store, b'{"how": "fail-fast", "said": "later"}')  # the first stays
    for node, listener in listeners.items():
        listener.join(30)
        assert not listener.is_alive(), node
    assert heard == {"b": loss, "d": loss}
    assert pulse.linger(store, {"a"}, 30.0)  # b and d have heard; c's ranks have ended


# -- ranks on one host --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def three_ranks(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], Path]]:
    """Three ranks of tests/scripts/failfast_ranks.py on this host, with
    torchrun's variables, ``SYNCDECO_FAIL_FAST=0`` and
    ``sd.init(fail_fast=True)``, which wins; rank 1 holds the GIL for 3 s
    in round 1.  Every one is gone at the end."""
    port, procs = _free_port(), []
    try:
        for rank in range(3):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": "3",
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "3",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "SYNCDECO_FAIL_FAST": "0",
            }
            log = open(tmp_path / f"log-{rank}.txt", "wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(RANKS), str(tmp_path), "--gil", "1", "3", "--init"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
            log.close()
        yield procs, tmp_path
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped rank dies only once continued
                proc.kill()
            proc.wait(10)


def _until(ready, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            said = "\n".join(
                f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
                for p in sorted(logs.glob("log-*.txt"))
            )
            pytest.fail(f"{what}: not within {timeout}s\n{said}")
        time.sleep(0.02)


def test_a_slow_rank_is_no_loss_and_a_killed_one_ends_the_others(three_ranks) -> None:
    """Round 1: rank 2 stopped (SIGSTOP) and rank 1 holding the GIL, for
    3 s each, while rank 0 waits in its all_reduce: no false alarm, the
    round completes.  Round 2: rank 2 is SIGKILLed while rank 0 is in an
    all_reduce (over a group rank 1 never joins) and rank 1 computes:
    both end with exit code 75 and one error naming rank 2."""
    procs, out = three_ranks
    _until(lambda: all((out / f"ready-{r}.json").exists() for r in range(3)), 120, "ready", out)
    os.kill(procs[2].pid, signal.SIGSTOP)
    (out / "go-1").write_text("")
    _until(lambda: (out / "in-1-0").exists(), 60, "rank 0 in its all_reduce", out)
    time.sleep(3)  # the fault's length, not an ordering
    os.kill(procs[2].pid, signal.SIGCONT)
    _until(lambda: all((out / f"round-1-{r}").exists() for r in range(3)), 60, "round 1", out)
    assert [p.poll() for p in procs] == [None, None, None]

    (out / "go-2").write_text("")
    _until(lambda: all((out / f"in-2-{r}").exists() for r in range(3)), 60, "round 2", out)
    procs[2].kill()
    for rank in (0, 1):
        procs[rank].wait(ENDED_WITHIN)
        said = (out / f"log-{rank}.txt").read_text()
        assert procs[rank].returncode == failfast.EXIT_CODE, said
        errors = [line for line in said.splitlines() if "syncdeco fail-fast" in line]
        assert len(errors) == 1, said
        assert errors[0].startswith(
            f"syncdeco fail-fast: rank {rank} ends with exit code 75: rank 2 on "
            f"{socket.gethostname()} ended without running Python's exit handlers"
        ), said


# -- two nodes ----------------------------------------------------------------------------


def _slurm(
    c: netns.Cluster, rank: int, world: int, per_node: int, port: int, on: bool
) -> dict[str, str]:
    """SLURM's variables for ``rank`` of a job on ``c`` (rank 0 hosts the
    job's store), fail-fast ``on`` or off."""
    return {
        **launcher_env("slurm", rank, world, per_node),
        "SLURM_JOB_ID": "4343",
        "SLURM_NNODES": str(world // per_node),
        "SLURMD_NODENAME": c.hosts[rank // per_node],
        "MASTER_ADDR": c.hosts[0],
        "MASTER_PORT": str(port),
        "SYNCDECO_FAIL_FAST": "1" if on else "0",
    }


class _Job:
    """The ranks of a job on a cluster: their output, and waits on them
    that fail the test (with every rank's output) if a rank ends first."""

    def __init__(self, procs: list) -> None:
        self.procs = procs

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}:\n{p.output()[-3000:]}" for r, p in enumerate(self.procs))

    def until(self, ready, what: str, survivors: tuple[int, ...] | None = None) -> None:
        watched = range(len(self.procs)) if survivors is None else survivors
        deadline = time.monotonic() + 120
        while not ready():
            ended = any(self.procs[r].poll() is not None for r in watched)
            if time.monotonic() > deadline or ended:
                pytest.fail(f"{what}: not so\n{self.logs()}")
            time.sleep(0.05)


@pytest.mark.parametrize("lost", [1, 0], ids=["second-node", "store-host"])
def test_a_node_lost_while_the_others_are_in_their_all_reduce_ends_them(
    tmp_path: Path, lost: int
) -> None:
    """Two nodes of two ranks (SLURM's variables; rank 0 hosts the job's
    store), fail-fast on; the ranks of one node wait in their own
    ``dist.all_reduce``, those of the other node compute, and that node is
    lost (link cut, then its processes killed).

    Node 1 lost: rank 0 hears it from the node watch, rank 1 from rank 0
    (its note, as rank 0 ends); both end with exit code 75 and one error
    naming ranks 2 and 3 on node1.  Node 0 lost (the store's host): ranks 2
    and 3 hear it from their connections to the store, and name rank 0."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    lost_ranks = [2 * lost, 2 * lost + 1]
    survivors = [r for r in range(4) if r not in lost_ranks]
    with netns.Cluster(nodes=2, workdir=tmp_path / "cluster") as c:
        port, procs = c.port(), []
        for rank in range(4):
            env = _slurm(c, rank, 4, 2, port, True)
            argv = [sys.executable, str(RANKS), str(tmp_path), "--busy", *map(str, lost_ranks)]
            procs.append(c.start(rank // 2, argv, env))

        job = _Job(procs)
        logs, until = job.logs, job.until

        until(lambda: all((tmp_path / f"ready-{r}.json").exists() for r in range(4)), "ready")
        (tmp_path / "go-1").write_text("")
        until(lambda: all((tmp_path / f"in-1-{r}").exists() for r in range(4)), "in round 1")
        c.lose(lost)
        shown = ""
        for rank in survivors:
            try:
                procs[rank].popen.wait(ENDED_WITHIN)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still runs {ENDED_WITHIN}s after the loss\n{logs()}")
            said = procs[rank].output()
            assert procs[rank].poll() == failfast.EXIT_CODE, logs()
            errors = [line for line in said.splitlines() if "syncdeco fail-fast" in line]
            assert len(errors) == 1, logs()
            named = (
                "ranks 2 and 3 on node1 were lost with their node"
                if lost == 1
                else "rank 0 on node0 was lost with the host of the job's store"
            )
            assert errors[0].startswith(
                f"syncdeco fail-fast: rank {rank} ends with exit code 75: {named}"
            ), logs()
            shown += errors[0] + "\n"
    if lost == 1:
        docs_output.check("tests/scripts/failfast_ranks.py (a lost node)", shown)  # docs/hangs.md


def test_a_lost_torchrun_node_ends_the_others_blocked_in_their_all_reduce(tmp_path: Path) -> None:
    """Two torchrun nodes of two ranks (torchrun's defaults: its agent stops
    a node's other workers, SIGTERM, as soon as one exits), fail-fast on by
    default; ranks 0 and 1 wait in their own ``dist.all_reduce``, node 1's
    ranks compute, and node 1 is lost.  Node 0's agent ends with the job:
    the first of its ranks to end exits 75 with one error naming ranks 2 and
    3, and the other either does the same or is ended by the agent's SIGTERM
    before it could (seen under load; torchrun's summary says which).  That
    the rank whose agent hosts the store waits for no lost node's pulse is
    tested with plain values above."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    with netns.Cluster(nodes=2, workdir=tmp_path / "cluster") as c:
        port, agents = c.port(), []
        for node in (0, 1):
            argv = [
                "timeout", "150", sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
                "--master-addr", c.addr(0), "--master-port", str(port),
                str(RANKS), str(tmp_path), "--busy", "2", "3",
            ]  # fmt: skip
            agents.append(c.start(node, argv, {"SYNCDECO_FAIL_FAST": ""}))
        job = _Job(agents)
        job.until(lambda: all((tmp_path / f"ready-{r}.json").exists() for r in range(4)), "ready")
        (tmp_path / "go-1").write_text("")
        job.until(lambda: all((tmp_path / f"in-1-{r}").exists() for r in range(4)), "in round 1")
        c.lose(1)
        try:
            agents[0].popen.wait(ENDED_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still runs {ENDED_WITHIN}s after the loss\n{job.logs()}")
        said = agents[0].output()
        pids = {r: json.loads((tmp_path / f"ready-{r}.json").read_text())["pid"] for r in (0, 1)}
        ended = {}  # rank: how torchrun's summary says it ended
        for rank, pid in pids.items():
            if f"exitcode  : 75 (pid: {pid})" in said:
                ended[rank] = "fail-fast"
            elif f"exitcode  : -15 (pid: {pid})" in said:
                ended[rank] = "the agent's SIGTERM"
        assert len(ended) == 2 and "fail-fast" in ended.values(), (ended, said)
        for rank, how in ended.items():
            errors = [ln for ln in said.splitlines() if f"syncdeco fail-fast: rank {rank} " in ln]
            if how == "fail-fast":
                assert len(errors) == 1, said
                assert "ranks 2 and 3 on node1 were lost with their node" in errors[0], said
            else:
                assert len(errors) <= 1, said  # the SIGTERM may come after its error


# -- three nodes --------------------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["fail-fast", "fail-fast-off"])
def test_a_node_lost_ends_the_ranks_of_every_other_node_not_only_the_watchers(
    tmp_path: Path, on: bool
) -> None:
    """Three nodes of one rank (SLURM's variables; rank 0 hosts the job's
    store and watches the other nodes' leases; rank 1 is its node's main
    but no watcher).  Ranks 0 and 1 wait in a loop of their own for a file
    (no collective's failure can end them), rank 2 computes, and node 2 is
    lost (link cut, then its processes killed).

    Fail-fast on: rank 0 judges node 2 lost, writes the job's loss mark and
    ends; node 1's pulse, waiting for the mark, hands it to its main, rank 1,
    which ends: both with exit code 75 and one error naming rank 2 on node2 (for
    rank 1, as heard first by rank 0).  Off: nothing ends; once rank 0 has
    judged node 2 lost, the test lets ranks 0 and 1 go on to a sync point,
    which raises on both, naming rank 2."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    with netns.Cluster(nodes=3, workdir=tmp_path / "cluster") as c:
        port, procs = c.port(), []
        for rank in range(3):
            env = {**_slurm(c, rank, 3, 1, port, on), "SLURM_JOB_ID": "4344"}
            argv = [sys.executable, str(RANKS), str(tmp_path), "--busy", "2", "--wait", "0", "1"]
            procs.append(c.start(rank, [*argv, "--debug"], env))

        job = _Job(procs)
        logs, until = job.logs, job.until

        until(lambda: all((tmp_path / f"ready-{r}.json").exists() for r in range(3)), "ready")
        (tmp_path / "go-1").write_text("")
        until(lambda: all((tmp_path / f"in-1-{r}").exists() for r in range(3)), "in round 1")
        cut = c.lose(2)
        if not on:
            # Rank 0 judged node 2 lost (its debug log says so); then, a
            # lower bound for a claim that nothing happens (not an order of
            # events): two renewals of rank 1's pulse, where a mark would
            # have reached it.  Nothing ended meanwhile (until() checks).
            until(lambda: ") lost" in procs[0].output(), "node 2 judged lost", (0, 1))
            renewed = time.monotonic() + 2 * lease.PERIOD
            until(lambda: time.monotonic() > renewed, "renewals", (0, 1))
            (tmp_path / "go-2").write_text("")
        ended_at: dict[int, float] = {}
        deadline = time.monotonic() + ENDED_WITHIN
        while len(ended_at) < 2:  # both watched at once, to print when each ended
            for rank in (0, 1):
                if rank not in ended_at and procs[rank].poll() is not None:
                    ended_at[rank] = time.time()
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still run {ENDED_WITHIN}s after the loss\n{logs()}")
            time.sleep(0.05)
        for rank in (0, 1):
            said = procs[rank].output()
            if not on:
                assert procs[rank].poll() == 3, logs()  # the sync point raised
                assert "syncdeco fail-fast" not in said, logs()
                (raised,) = [x for x in said.splitlines() if x.startswith("sync point raised")]
                assert "rank 2" in raised, logs()
                continue
            assert procs[rank].poll() == failfast.EXIT_CODE, logs()
            errors = [line for line in said.splitlines() if "syncdeco fail-fast" in line]
            assert len(errors) == 1, logs()
            heard = "" if rank == 0 else " (rank 0, on node0, heard it first and ended)"
            assert errors[0].startswith(
                f"syncdeco fail-fast: rank {rank} ends with exit code 75: rank 2 on node2 was "
                f"lost with its node (it went silent: power, a crash, or a cut link){heard}. "
            ), logs()
            if rank == 1:  # docs/hangs.md
                docs_output.check("tests/scripts/failfast_ranks.py (another node)", errors[0])
        # Not asserted (the machine may be loaded): printed for the docs.
        took = (f"rank {r} ended {t - cut:.1f} s after the cut" for r, t in ended_at.items())
        print(", ".join(took))
