"""A cluster of "nodes" on one machine, for multi-node faults on real processes.

Each node is a network namespace of its own, wired to a switch (a bridge in
one more namespace) by a veth pair, with an address in a test-only subnet,
loopback up, an ``/etc/hosts`` that names every node, and a host name of its
own: a command run on a node is a real process in that namespace and in a UTS
namespace whose host name is the node's (``socket.gethostname()`` says
``node1``).  A Python script is forked from the zygote (``zygote.py``),
which enters the node's namespaces itself, as ``ip netns exec`` and
``unshare --uts`` would (a fresh interpreter would spend a second of CPU
importing torch); any other command runs under ``ip netns exec``::

    with Cluster(nodes=2) as c:
        a = c.start(0, [sys.executable, "job.py"], env={"MASTER_ADDR": c.addr(0)})
        c.lose(1)   # node 1's link is cut (nobody hears a FIN or RST), then
                    # every process on it is SIGKILLed
        ...

What a fault means here:

* :meth:`Cluster.cut` takes a node off the switch: the switch's end of its
  veth pair goes down, so not one packet leaves or reaches the node (the node
  sees its carrier go, as when a cable is pulled; its processes go on). No
  FIN or RST reaches anyone. :meth:`Cluster.heal` puts it back. (This kernel
  has no ``netem``: a cut is a link down, not ``loss 100%``.)
* :meth:`Cluster.lose` is a lost node: cut first, then every process in the
  node's namespace SIGKILLed, so its peers learn nothing from the kill.
* :meth:`Cluster.kill` kills a node's processes and leaves its link up: the
  kernel of the node closes their sockets, a different fault.
* :meth:`Cluster.stop` / :meth:`Cluster.cont` SIGSTOP / SIGCONT one process.

Traffic only ever goes between the namespaces a cluster made: the subnet is
reachable from nowhere else and the root namespace has no address in it.
Names (namespaces, the ``/etc/netns`` files) are unique per process and
cluster, so clusters run side by side under pytest-xdist.  Closing the
cluster (the ``with`` block's end, also on a failure or an interrupt) kills
every process left in its namespaces, whoever started it, and deletes every
namespace, and with them every link and address; a cluster left behind by a
test process that was itself SIGKILLed is removed by the next cluster made.

Needs root and ``ip`` (iproute2) and ``unshare`` (util-linux);
:func:`unavailable` says why a cluster cannot be made here.

By hand: ``python tests/netns.py --nodes 2`` makes a cluster, prints how to
run a command on each node, and tears it all down at Enter or Ctrl-C.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import zygote

SUBNET = "10.213.47"  # a /24 no real network here uses; node i is SUBNET.(i + 1)
PREFIX = "sdnet-"  # every namespace a cluster makes: sdnet-<pid>-<n>-<node or sw>
IFNAME = "eth0"  # a node's end of its veth pair, inside the node's namespace
FIRST_PORT = 20000  # below the ephemeral range (32768-60999): a port nothing else takes

# What a test process must not hand down to a job it starts on a node.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_TASKS_PER_NODE",
    "TORCHELASTIC_RUN_ID",
)

_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why a cluster cannot be made on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); this test runs as a user"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (iproute2 / util-linux / hostname)"
    name = f"{PREFIX}{os.getpid()}-probe{next(_counter)}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return "'ip netns add' is refused here (a container without CAP_SYS_ADMIN?): " + (
            made.stderr.strip() or f"exit status {made.returncode}"
        )
    try:
        probe = subprocess.run(
            ["ip", "netns", "exec", name, "unshare", "--uts", "hostname", "probe"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode != 0:
            return "a UTS namespace cannot be made in a network namespace: " + probe.stderr.strip()
    finally:
        _ip("netns", "del", name, check=False)
    return None


class Proc:
    """A process started on a node: its Popen, and its output in a file
    (stdout and stderr together; read it with :meth:`output`, which never
    blocks, or look for the files the job writes)."""

    __slots__ = ("log", "node", "popen")

    def __init__(
        self, popen: subprocess.Popen[bytes] | zygote.Forked, node: int, log: Path
    ) -> None:
        self.popen = popen
        self.node = node
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """What it has printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def poll(self) -> int | None:
        return self.popen.poll()


class Cluster:
    """``nodes`` nodes on one switch; see the module's docstring.

    ``workdir`` holds the processes' output (``<workdir>/node<i>-<n>.log``);
    by default a directory of the cluster's own under /tmp, removed at close.
    """

    def __init__(self, nodes: int = 2, *, workdir: Path | None = None) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes={nodes}: a cluster has 1 to 200 nodes")
        self.size = nodes
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.switch = f"{self.tag}-sw"
        self.namespaces = [f"{self.tag}-n{i}" for i in range(nodes)]
        self.hosts = [f"node{i}" for i in range(nodes)]
        self._own_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(f"/tmp/{self.tag}")
        self.procs: list[Proc] = []
        self._ports = itertools.count(FIRST_PORT)
        self._made: list[str] = []  # namespaces made so far, deleted at close
        self._etc: list[Path] = []  # /etc/netns/<ns> directories made so far
        self._cut: set[int] = set()

    # -- the cluster's life -------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception as problem:
            if exc is None:
                raise  # the test passed: what was left behind fails it
            warnings.warn(f"{problem} (after: {exc!r})", RuntimeWarning, stacklevel=2)

    def _up(self) -> None:
        remove_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The v4-mapped v6 names too: torch's store looks up the name of a
        # client that reached its IPv6 socket by an IPv4 address.
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{self.addr(i)} {self.hosts[i]}\n::ffff:{self.addr(i)} {self.hosts[i]}\n"
            for i in range(self.size)
        )
        self._netns_add(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            self._netns_add(ns)
            # Both ends are made inside their namespaces: no link ever exists
            # in the root namespace, so names never clash across clusters.
            _ip("link", "add", "name", IFNAME, "netns", ns, "type", "veth",
                "peer", "name", self.port_name(i), "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", self.port_name(i), "master", "br0")
            _ip("-n", self.switch, "link", "set", self.port_name(i), "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc: every node
            # knows every node's name, and asks no name server outside.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            self._etc.append(etc)
            (etc / "hosts").write_text(hosts)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _await_entry(self, proc: Proc, ns: str, within: float = 30.0) -> None:
        """Wait until ``proc`` (forked by the zygote) is in namespace ``ns``,
        so that a kill of the node's processes right after this finds it;
        or until it ended (entering failed: its log says why)."""
        inode = os.stat(f"/run/netns/{ns}").st_ino
        deadline = time.monotonic() + within
        while proc.poll() is None:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == inode:
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {proc.pid} did not enter {ns} within {within}s")
            time.sleep(0.005)

    def _netns_add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        """Kill every process in the cluster's namespaces, delete them (and
        so every link, address and qdisc in them) and the files made for
        them.  Raises RuntimeError, once all of it was tried, if anything is
        left."""
        problems: list[str] = []
        for ns in self._made:
            if ns != self.switch:
                left = _kill_namespace(ns)
                if left:
                    problems.append(f"processes {left} in {ns} would not die")
        for proc in self.procs:
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                problems.append(f"process {proc.pid} on node {proc.node} was not reaped")
        for ns in reversed(self._made):
            done = _ip("netns", "del", ns, check=False)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        self._made.clear()
        for etc in self._etc:
            shutil.rmtree(etc, ignore_errors=True)
        self._etc.clear()  # /etc/netns itself stays: another cluster may be making files there
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        left = [ns for ns in list_namespaces() if ns.startswith(self.tag + "-")]
        if left:
            problems.append(f"namespaces left: {left}")
        if problems:
            raise RuntimeError("the cluster was not torn down cleanly: " + "; ".join(problems))

    # -- what a test asks of it -------------------------------------------------------

    def addr(self, node: int) -> str:
        """Node ``node``'s address (on its ``eth0``)."""
        return f"{SUBNET}.{node + 1}"

    def port_name(self, node: int) -> str:
        """The switch's end of node ``node``'s link, in the switch's namespace."""
        return f"p{node}"

    def port(self) -> int:
        """A TCP port for a job's store, used by no earlier job of this
        cluster (so no socket of an earlier job lingers on it)."""
        return next(self._ports)

    def start(
        self,
        node: int,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``argv`` on ``node``: in its network namespace, with the
        node's host name, in a session of its own, with this process's
        environment less any launcher's variables, OMP_NUM_THREADS=1, and
        ``env`` on top.  Its output goes to a file (see :class:`Proc`)."""
        full = {**os.environ, "OMP_NUM_THREADS": "1"}
        for key in LAUNCHER_VARIABLES:
            full.pop(key, None)
        full.update(env or {})
        log = self.workdir / f"node{node}-{len(self.procs)}.log"
        if len(argv) > 1 and argv[0] == sys.executable and argv[1].endswith(".py"):
            # A script: forked from the zygote, which enters the node's
            # namespaces as the command below would (a second of CPU less
            # than a fresh interpreter importing torch).
            with open(log, "wb") as out:
                forked = zygote.spawn(
                    argv[1:],
                    full,
                    cwd,
                    out=out.fileno(),
                    node={"netns": self.namespaces[node], "hostname": self.hosts[node]},
                )
            proc = Proc(forked, node, log)
            self.procs.append(proc)
            self._await_entry(proc, self.namespaces[node])
            return proc
        # ip netns exec, unshare and sh each exec the next: the Popen's pid is
        # the command's own.
        wrapped = [
            "ip", "netns", "exec", self.namespaces[node],
            "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.hosts[node], *argv,
        ]  # fmt: skip
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                wrapped,
                env=full,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(popen, node, log)
        self.procs.append(proc)
        return proc

    def run(self, node: int, argv: Sequence[str], timeout: float = 30) -> str:
        """Run a short command on ``node`` (e.g. ``["ss", "-tnp"]``) and
        return its output; raises CalledProcessError if it fails."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.namespaces[node], *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout

    def cut(self, node: int) -> float:
        """Take ``node`` off the switch: nothing leaves or reaches it from
        now on, and no FIN or RST reaches anyone.  Returns the time
        (``time.time()``) the link went down."""
        _ip("-n", self.switch, "link", "set", self.port_name(node), "down")
        self._cut.add(node)
        return time.time()

    def heal(self, node: int) -> None:
        """Put ``node`` back on the switch."""
        _ip("-n", self.switch, "link", "set", self.port_name(node), "up")
        self._cut.discard(node)

    def is_cut(self, node: int) -> bool:
        return node in self._cut

    def lose(self, node: int) -> float:
        """Lose ``node``: cut its link, then SIGKILL every process on it.
        Returns the time of the cut, the moment the node was lost to the
        others."""
        at = self.cut(node)
        self.kill(node)
        return at

    def kill(self, node: int) -> None:
        """SIGKILL every process on ``node`` (every process in its
        namespace, started by :meth:`start` or by those), and reap the ones
        :meth:`start` started.  Leaves its link as it is."""
        left = _kill_namespace(self.namespaces[node])
        if left:
            raise RuntimeError(f"processes {left} on node {node} would not die")
        for proc in self.procs:
            if proc.node == node:
                proc.popen.wait(5)

    def pids(self, node: int) -> list[int]:
        """Every process now on ``node``."""
        return _namespace_pids(self.namespaces[node])

    def signal(self, pid: int, sig: int) -> None:
        """Send ``sig`` to process ``pid``, which must be on a node of this
        cluster (a typo must not signal a process of the machine)."""
        if not any(pid in self.pids(n) for n in range(self.size)):
            raise ValueError(f"process {pid} is on no node of this cluster")
        os.kill(pid, sig)

    def stop(self, pid: int) -> None:
        """SIGSTOP process ``pid`` (see :meth:`signal`)."""
        self.signal(pid, signal.SIGSTOP)

    def cont(self, pid: int) -> None:
        """SIGCONT process ``pid`` (see :meth:`signal`)."""
        self.signal(pid, signal.SIGCONT)

    def reset(self) -> None:
        """Kill every process on every node and heal every link: the
        cluster as :meth:`__enter__` left it, for the next test."""
        for node in range(self.size):
            self.kill(node)
            if node in self._cut:
                self.heal(node)
        self.procs.clear()


def list_namespaces() -> list[str]:
    """The names of every network namespace `ip netns` knows."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _namespace_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_namespace(ns: str, deadline: float = 10.0) -> list[int]:
    """SIGKILL every process in namespace ``ns`` until none is left (a
    process may fork while we kill); returns those left at ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        pids = _namespace_pids(ns)
        alive = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            alive.append(pid)
        # A killed process leaves the namespace only when it is gone;
        # a zombie (a child not reaped yet) is still listed: skip it.
        alive = [p for p in alive if not _zombie(p)]
        if not alive:
            return []
        if time.monotonic() > end:
            return alive
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True  # gone


def remove_stale() -> None:
    """Delete clusters whose test process is gone (it was SIGKILLed and
    could not tear its cluster down): their processes and namespaces."""
    for ns in list_namespaces():
        if not ns.startswith(PREFIX):
            continue
        try:
            owner = int(ns[len(PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        _kill_namespace(ns)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        shutil.rmtree(Path("/tmp") / ns.rsplit("-", 1)[0], ignore_errors=True)


def _main() -> None:
    import argparse
    import shlex

    parser = argparse.ArgumentParser(description="A cluster of namespaces, until Enter.")
    parser.add_argument("--nodes", type=int, default=2)
    nodes = parser.parse_args().nodes
    why = unavailable()
    if why is not None:
        raise SystemExit(why)
    with Cluster(nodes=nodes) as c:
        for i in range(nodes):
            run = f"ip netns exec {c.namespaces[i]} unshare --uts -- sh -c "
            run += shlex.quote('hostname "$0" && exec "$@"') + f" {c.hosts[i]} COMMAND..."
            print(f"node {i}: {c.hosts[i]} {c.addr(i)}\n  {run}")
        print(f"cut node i:  ip -n {c.switch} link set p<i> down   (heal: up)")
        print("Enter (or Ctrl-C) tears it all down, with every process on it.")
        try:
            input()
        except (KeyboardInterrupt, EOFError):
            pass


if __name__ == "__main__":
    _main()
