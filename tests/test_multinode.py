"""Multi-node faults on real processes: each node a network namespace with its
own host name and address, on one switch (tests/netns.py).  A lost node is
cut off first (no FIN or RST reaches anyone), then its processes are killed.

Every job here runs tests/scripts/node_ranks.py: each rank passes two sync
points, says it is ready, and waits at ``sd.barrier("wait")``; what that
barrier did lands in a file per rank.  The tests need root and ``ip netns``;
elsewhere they are skipped, saying why.

To run one by hand (as root), e.g. a lost torchrun node::

    cd <repo> && PYTHONPATH=$PWD python -m pytest tests/test_multinode.py \\
        -k lost_torchrun_node -q

A test that fails shows the survivors' stacks and every process's output.
The files stay in pytest's tmp directory
(``/tmp/pytest-of-root/pytest-current/``: ``cluster0/node<i>-<n>.log``, and
each test's ``ready-``, ``result-``, ``done-<rank>.json``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docs_output
import netns
import pytest

RANKS = Path(__file__).parent / "scripts" / "node_ranks.py"
STARTUP = 120.0  # every rank ready: torch's import on a loaded machine of two cores
NAMED_WITHIN = 10.0  # the promise: every survivor names the lost ranks within this
WAIT_AFTER_LOSS = NAMED_WITHIN + 2  # how long a test waits for the survivors before it fails
GIL_HELD = 60  # the false alarms of issue 17, as it states them
STOPPED = 30
PACKETS_DROPPED = 3


class StillWaiting(AssertionError):
    """Survivors still waited at the sync point when the test gave up: no
    rank heard of the loss."""


def _skip_without_namespaces() -> None:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces: {why}")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[netns.Cluster]:
    """Three nodes for the module's tests, one test at a time.

    The false-alarm job (a minute of waiting, on a cluster of its own) starts
    first, when its test is to run, and runs while the other tests do: the
    module then takes a minute less."""
    _skip_without_namespaces()
    if any(
        item.name == test_no_false_alarm_for_a_held_gil_a_stopped_rank_or_a_short_cut.__name__
        for item in request.session.items
    ):
        request.getfixturevalue("false_alarms")
    with netns.Cluster(nodes=3, workdir=tmp_path_factory.mktemp("cluster")) as made:
        yield made


@pytest.fixture
def c(cluster: netns.Cluster) -> Iterator[netns.Cluster]:
    """The module's cluster, given back with no process on it and every link up."""
    try:
        yield cluster
    finally:
        cluster.reset()


def facts(out: Path, kind: str, rank: int) -> dict[str, object] | None:
    """What ``rank`` wrote to ``out``'s ``kind`` file, if it has."""
    path = out / f"{kind}-{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Job:
    """A job of ``world`` ranks started on ``cluster``; its ranks write to ``out``."""

    cluster: netns.Cluster
    out: Path
    world: int
    nodes: tuple[int, ...]  # the node of each rank
    procs: list[netns.Proc]

    def log(self) -> str:
        return "\n".join(
            f"--- node {p.node}, pid {p.pid} (exit {p.poll()}):\n{p.output()[-4000:]}"
            for p in self.procs
        )

    def facts(self, kind: str, rank: int) -> dict[str, object] | None:
        return facts(self.out, kind, rank)

    def wait_for(self, kind: str, ranks: Sequence[int], timeout: float) -> dict[int, dict]:
        """The ``kind`` files of ``ranks``, once all are there; fails the
        test at ``timeout`` seconds, or at once when every process ended."""
        deadline = time.monotonic() + timeout
        while True:
            got = {r: self.facts(kind, r) for r in ranks}
            if all(f is not None for f in got.values()):
                return got  # type: ignore[return-value]
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                missing = [r for r, f in got.items() if f is None]
                pytest.fail(f"no {kind} file from ranks {missing} in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stacks(self, ranks: Sequence[int]) -> str:
        """Where each of ``ranks`` is now: every thread's stack (SIGUSR1 to
        faulthandler in node_ranks.py)."""
        said = []
        for rank in ranks:
            pid = int(self.facts("ready", rank)["pid"])  # type: ignore[index]
            path = self.out / f"stacks-{pid}.txt"
            try:
                self.cluster.signal(pid, signal.SIGUSR1)
            except (ValueError, ProcessLookupError):
                said.append(f"--- rank {rank} (pid {pid}) is gone")
                continue
            deadline = time.monotonic() + 3
            while path.stat().st_size == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # faulthandler writes thread by thread
            said.append(f"--- rank {rank} (pid {pid}) waits here:\n{path.read_text()}")
        return "\n".join(said)

    def ready(self) -> dict[int, dict]:
        """Every rank's ready file: all of them passed the warm-up."""
        return self.wait_for("ready", range(self.world), STARTUP)

    def named(
        self,
        survivors: Sequence[int],
        lost: Sequence[int],
        since: float,
        within: float = NAMED_WITHIN,
    ) -> None:
        """Every survivor raised a SyncError naming each of ``lost`` within
        ``within`` seconds of ``since``.  Raises StillWaiting when, after
        WAIT_AFTER_LOSS seconds, a survivor has neither raised nor ended."""
        deadline = since + WAIT_AFTER_LOSS
        while time.time() < deadline:
            if all(self.facts("result", r) is not None for r in survivors):
                break
            time.sleep(0.05)
        results = {r: self.facts("result", r) for r in survivors}
        waiting = [r for r, f in results.items() if f is None]
        if waiting:
            raise StillWaiting(
                f"ranks {waiting} still wait at 'wait' {WAIT_AFTER_LOSS:.0f} s after ranks "
                f"{list(lost)} were lost; results: {results}\n{self.stacks(waiting)}\n{self.log()}"
            )
        for rank, f in results.items():
            assert f is not None and f["outcome"] == "raised", (rank, f, self.log())
            assert f["sync_error"], (rank, f)
            assert set(lost) <= named_ranks(f), (rank, f)
            took = float(f["time"]) - since  # type: ignore[arg-type]
            assert took < within, f"rank {rank} named the loss after {took:.1f}s: {f}"


def named_ranks(result: dict) -> set[int]:
    """The ranks an error names: its rank attributes, and the numbers after
    "rank"/"ranks" in its message."""
    found: set[int] = set()
    for value in result.get("names", {}).values():
        found.update(value if isinstance(value, list) else [value])
    for run in re.findall(r"\branks? ((?:\d+(?:, | and |,)?)+)", result.get("message", "")):
        found.update(int(n) for n in re.findall(r"\d+", run))
    return found


def torchrun(c: netns.Cluster, out: Path, nodes: Sequence[int], per_node: int, *args: str) -> Job:
    """A torchrun agent on each of ``nodes`` (static rendezvous at the first
    one's address; a slow monitor, so that an agent does not tear down its
    workers when one of them raises before the others have reported)."""
    port = c.port()
    procs = [
        c.start(node, [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(len(nodes)), "--nproc-per-node", str(per_node),
            "--node-rank", str(i), "--master-addr", c.addr(nodes[0]),
            "--master-port", str(port), "--monitor-interval", "600",
            str(RANKS), str(out), *args,
        ])
        for i, node in enumerate(nodes)
    ]  # fmt: skip
    return Job(
        c, out, len(nodes) * per_node, tuple(n for n in nodes for _ in range(per_node)), procs
    )


def slurm(c: netns.Cluster, out: Path, nodes: Sequence[int], per_node: int, *args: str) -> Job:
    """The ranks as srun starts them: plain processes with SLURM's variables,
    MASTER_ADDR the first node's host name (as a job script sets it), so
    that rank 0 hosts the job's store."""
    port, world = c.port(), len(nodes) * per_node
    procs = []
    for rank in range(world):
        node = nodes[rank // per_node]
        env = {
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(world),
            "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(rank // per_node),
            "SLURM_NNODES": str(len(nodes)),
            "SLURM_TASKS_PER_NODE": f"{per_node}(x{len(nodes)})",
            "SLURMD_NODENAME": c.hosts[node],
            "MASTER_ADDR": c.hosts[nodes[0]],
            "MASTER_PORT": str(port),
        }
        procs.append(c.start(node, [sys.executable, str(RANKS), str(out), *args], env))
    return Job(c, out, world, tuple(n for n in nodes for _ in range(per_node)), procs)


# -- the harness itself ------------------------------------------------------------------


def hosts_of(c: netns.Cluster) -> dict[int, list[str]]:
    """Each node's host name and address."""
    return {node: [c.hosts[node], c.addr(node)] for node in range(c.size)}


def assert_on_their_hosts(
    nodes: Sequence[int],
    ready: dict[int, dict],
    pids: dict[int, list[int]],
    hosts: dict[int, list[str]],
) -> None:
    """Every rank runs on its node (``nodes``: each rank's; ``pids``: each
    node's processes), by the node's host name and address (``hosts``); the
    launcher's node index counts the job's nodes in order."""
    order = sorted(set(nodes))
    for rank, f in ready.items():
        node = nodes[rank]
        host, addr = hosts[node]
        assert (f["host"], f["addr"], f["node"]) == (host, addr, str(order.index(node))), (rank, f)
        assert f["pid"] in pids[node], (rank, f, pids)


# Under SLURM's variables the false-alarm job (three nodes, below) is the
# job with no lasting fault: it checks the hosts and the passes there.
def test_a_job_of_two_nodes_sees_its_hosts(c: netns.Cluster, tmp_path: Path) -> None:
    """With no fault, every rank runs on its node, by the node's host name
    and address, and the job passes its sync points."""
    job = torchrun(c, tmp_path, (0, 1), 2)
    ready = job.ready()
    assert_on_their_hosts(job.nodes, ready, {node: c.pids(node) for node in (0, 1)}, hosts_of(c))
    results = job.wait_for("done", range(4), 60)
    assert len(results) == 4
    assert all(job.facts("result", r)["outcome"] == "passed" for r in range(4))  # type: ignore[index]


_SERVER = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
for _ in range(2):
    conn, (addr, _) = srv.accept()
    print("from", addr, conn.recv(16).decode(), flush=True)
    conn.setblocking(False)
    globals().setdefault("conns", []).append((addr, conn))
import select
while True:
    readable, _, _ = select.select([c for _, c in conns], [], [])
    for addr, conn in conns:
        if conn in readable:
            try:
                data = conn.recv(16)
            except OSError as exc:
                data = repr(exc).encode()
            print("end", addr, data or b"EOF", flush=True)
            conns.remove((addr, conn))
"""
_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(socket.gethostname().encode())
time.sleep(600)
"""


def test_a_lost_node_sends_nothing_a_killed_process_does(c: netns.Cluster) -> None:
    """A lost node (cut, then killed) leaves its peers' connections open and
    silent; a process killed on a connected node is heard at once (its
    kernel closes the socket).  Then nothing of the cluster is left."""
    port = c.port()
    server = c.start(0, [sys.executable, "-c", _SERVER, str(port)])
    _until(lambda: str(port) in c.run(0, ["ss", "-tln"]), 30, "the server listening")
    for node in (1, 2):
        c.start(node, [sys.executable, "-c", _CLIENT, c.hosts[0], str(port)])
    _until(lambda: server.output().count("from") == 2, 30, "both clients connected")
    said = server.output()
    assert "from 10.213.47.2 node1" in said and "from 10.213.47.3 node2" in said, said
    c.lose(1)
    c.kill(2)
    _until(lambda: "end 10.213.47.3 b'EOF'" in server.output(), 10, "node 2's EOF")
    time.sleep(2)  # the fault's length: nothing may arrive from the lost node meanwhile
    assert "10.213.47.2" not in server.output().split("end", 1)[1], server.output()
    assert "ESTAB" in c.run(0, ["ss", "-tn", "dst", "10.213.47.2"])


def test_teardown_leaves_nothing_behind(tmp_path: Path) -> None:
    """A test that fails inside its cluster leaves no namespace, link,
    file or process behind, not even a process in a session of its own."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    links_before = netns._ip("-o", "link").stdout.count("\n")
    pids: list[int] = []
    with pytest.raises(ZeroDivisionError):
        with netns.Cluster(nodes=2, workdir=tmp_path) as made:
            names = [made.switch, *made.namespaces]
            made.start(1, ["sh", "-c", "setsid sleep 300 & exec sleep 300"])
            made.cut(1)
            _until(lambda: len(made.pids(1)) == 2, 10, "both sleeps")
            pids = made.pids(1)
            raise ZeroDivisionError("the test failed")
    assert not set(names) & set(netns.list_namespaces())
    assert not any(Path("/etc/netns", n).exists() for n in names)
    assert all(not Path(f"/proc/{p}").exists() or netns._zombie(p) for p in pids), pids
    assert netns._ip("-o", "link").stdout.count("\n") == links_before


def _until(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)


# -- lost nodes (issue 17, item 5) -------------------------------------------------------


def test_a_lost_torchrun_node_is_named_by_every_survivor(c: netns.Cluster, tmp_path: Path) -> None:
    """Two torchrun nodes of two ranks, all waiting with no timeout; node 1
    is lost: ranks 0 and 1 name ranks 2 and 3 within 10 s."""
    job = torchrun(c, tmp_path, (0, 1), 2, "--busy", "2", "3")
    job.ready()
    since = c.lose(1)
    job.named([0, 1], [2, 3], since=since)
    said = ""
    for rank in (0, 1):
        f = job.facts("result", rank)
        assert f is not None and f["type"] == "RankLostError", f
        took = float(f["time"]) - since  # type: ignore[arg-type]
        said += f"[rank {rank}] RankLostError {took:.1f}s after the loss: {f['message']}\n"
    docs_output.check("tests/scripts/node_ranks.py (a lost node)", said)  # docs/errors.md


def test_the_store_host_lost_under_slurm_is_named(c: netns.Cluster, tmp_path: Path) -> None:
    """SLURM variables, two nodes of two ranks, no timeout; node 0 (rank 0,
    the host of the job's store) is lost: ranks 2 and 3 name ranks 0 and 1
    within 10 s."""
    job = slurm(c, tmp_path, (0, 1), 2, "--busy", "0", "1")
    job.ready()
    job.named([2, 3], [0, 1], since=c.lose(0))


def test_the_store_host_lost_under_slurm_with_a_timeout(c: netns.Cluster, tmp_path: Path) -> None:
    """As above with ``timeout=5`` at the sync point: the survivors raise
    within 10 s of the loss (a store that does not answer must not stretch
    the timeout)."""
    job = slurm(c, tmp_path, (0, 1), 2, "--timeout", "5", "--busy", "0", "1")
    job.ready()
    since = c.lose(0)
    job.named([2, 3], [], since=since)


def test_a_rank_alone_on_its_lost_host_is_named(c: netns.Cluster, tmp_path: Path) -> None:
    """Three torchrun nodes of one rank each; node 2 is lost: ranks 0 and 1
    name rank 2 within 10 s."""
    job = torchrun(c, tmp_path, (0, 1, 2), 1, "--busy", "2")
    job.ready()
    job.named([0, 1], [2], since=c.lose(2))


def test_a_killed_member_under_slurm_is_named_within_5s(c: netns.Cluster, tmp_path: Path) -> None:
    """SLURM variables, two nodes of two ranks; rank 3 alone is SIGKILLed
    (its node stays up): every survivor names it within 5 s."""
    job = slurm(c, tmp_path, (0, 1), 2, "--busy", "3")
    ready = job.ready()
    since = time.time()
    c.signal(int(ready[3]["pid"]), signal.SIGKILL)
    job.named([0, 1, 2], [3], since=since, within=5.0)


# -- false alarms ------------------------------------------------------------------------


class FalseAlarms:
    """The false-alarm job, on a cluster of its own (its faults cut node 0),
    with a thread that makes the faults once every rank is ready and then
    writes what it saw to ``faults.json``.  Everything the test reads is a
    file under ``where``, so that under pytest-xdist one worker runs the job
    and its test may run in another."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.cluster = netns.Cluster(nodes=3, workdir=where / "cluster")
        self.out = where / "job"
        self.out.mkdir()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._faults, daemon=True)

    def __enter__(self) -> FalseAlarms:
        self.cluster.__enter__()
        self.job = slurm(self.cluster, self.out, (0, 1, 2), 2, "--gil", "3", str(GIL_HELD))
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The test may be reading the job in another worker: let the job end
        # (every rank done, or ended) within its own bound first.
        deadline = time.monotonic() + STARTUP + GIL_HELD + 60
        while time.monotonic() < deadline and not self.closing.is_set():
            ended = all(p.poll() is not None for p in self.job.procs)
            if ended or all(self.job.facts("done", r) for r in range(6)):
                break
            self.closing.wait(0.2)
        self.closing.set()
        try:
            self.cluster.close()  # the thread's waits end with the processes
        finally:
            self.thread.join(10)

    def _faults(self) -> None:
        """Rank 3 holds the GIL, rank 4 is stopped, node 0 drops every
        packet, all from the same instant; each fault ends on its own time."""
        said: dict[str, object] = {"failed": None}
        try:
            ready = self.job.ready()
            pids = {n: self.cluster.pids(n) for n in (0, 1, 2)}
            said.update(ready=ready, pids=pids, hosts=hosts_of(self.cluster))
            said["keys"] = ["ready", "pids", "hosts"]
            (self.out / "go").write_text("")
            stopped = int(ready[4]["pid"])
            start = time.monotonic()
            self.cluster.stop(stopped)
            try:
                self.cluster.cut(0)
                self.closing.wait(PACKETS_DROPPED)  # the faults' lengths, not an ordering
                self.cluster.heal(0)
                self.closing.wait(max(0.0, STOPPED - (time.monotonic() - start)))
            finally:
                self.cluster.cont(stopped)
        except BaseException:  # pytest.fail too: the test reports it
            said["failed"] = traceback.format_exc()
        finally:
            (self.where / "faults.json.tmp").write_text(json.dumps(said))
            (self.where / "faults.json.tmp").rename(self.where / "faults.json")


@pytest.fixture(scope="session")
def false_alarms(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """The false-alarm job's directory.  The first process to ask (of the
    xdist workers, which share the parent of their temporary directories)
    runs the job, until the end of its session; the others only read it."""
    _skip_without_namespaces()
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # pytest-xdist's popen-gw<N>
        base = base.parent
    where = base / "false-alarms"
    try:
        where.mkdir()
    except FileExistsError:  # another worker runs it
        yield where
        return
    with FalseAlarms(where):
        yield where


def test_no_false_alarm_for_a_held_gil_a_stopped_rank_or_a_short_cut(false_alarms: Path) -> None:
    """Three nodes of two ranks under SLURM variables, all at a sync point
    with no timeout, while at once: rank 3 holds the GIL for 60 s in a C call,
    rank 4 (node 2's first rank) is SIGSTOPped for 30 s, and node 0 (the
    store's host) drops every packet for 3 s.  Nobody is declared lost: when
    all three are over, every rank passes the sync point and the next one.
    Before the faults, every rank ran on its node, by its host name and
    address (as test_a_job_of_two_nodes_sees_its_hosts checks under torchrun)."""
    faults = false_alarms / "faults.json"
    deadline = time.monotonic() + STARTUP + STOPPED + 10
    while not faults.exists():
        assert time.monotonic() < deadline, "the faults did not end"
        time.sleep(0.1)
    said = json.loads(faults.read_text())
    assert said["failed"] is None, said["failed"]
    # the job as the faults' thread saw it (JSON keys are strings)
    ready, pids, hosts = ({int(k): v for k, v in said[key].items()} for key in said["keys"])
    assert sorted(ready) == list(range(6)), ready
    assert_on_their_hosts((0, 0, 1, 1, 2, 2), ready, pids, hosts)
    out = false_alarms / "job"
    deadline = time.monotonic() + GIL_HELD + 60
    while not all(facts(out, "done", r) for r in range(6)):
        outcomes = {r: facts(out, "result", r) for r in range(6)}
        assert time.monotonic() < deadline, f"not every rank done: {outcomes}"
        time.sleep(0.1)
    outcomes = {r: facts(out, "result", r) for r in range(6)}
    assert all(f is not None and f["outcome"] == "passed" for f in outcomes.values()), outcomes
    held = facts(out, "gil", 3)
    assert held is not None and "to" in held, "rank 3 did not hold the GIL"


def test_a_cluster_whose_test_process_died_is_removed() -> None:
    """A test process SIGKILLed inside a cluster cannot tear it down: the
    next cluster made removes it, with its processes."""
    _skip_without_namespaces()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now
    stale = f"{netns.PREFIX}{dead.pid}-0-n0"
    netns._ip("netns", "add", stale)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "300"])
    try:
        _until(lambda: sleeper.pid in netns._namespace_pids(stale), 10, "the sleep")
        with netns.Cluster(nodes=1):
            assert stale not in netns.list_namespaces()
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        netns._ip("netns", "del", stale, check=False)
