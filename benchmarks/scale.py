"""The sync plane at scale: simulated ranks against a real TCPStore.

    python benchmarks/scale.py            # 16, 128, 1024 and 4096 ranks (3 minutes on 2 cores)
    python benchmarks/scale.py --smoke    # 16 ranks in one worker, 2 sync points a design (seconds)

Each simulated rank is a thread with its own TCPStore client connection and
its own ``syncdeco._plane.exchange.Exchange`` (the product code, not a copy),
ranks spread round robin over a few worker processes, against one real
TCPStore server (libuv) hosted in a process of its own so that its CPU time
can be read.  Nodes of 8 ranks: ``Place(node=f"n{rank // 8}", rank % 8, 8)``.
The worker processes lengthen the GIL's switch interval (``SWITCH_INTERVAL``):
with CPython's 5 ms, a thousand threads a process starve each other.
Three designs in the same run, in interleaved rounds:

* ``Queues``: the flat star up to 0.1 (a queue per member; the main pops
  each in turn and pushes one verdict per member);
* ``Keys``: the batched flat star (a key per member; the main waits once and
  reads all frames in one ``multi_get``; one verdict key);
* ``Nodes``: ``Keys`` with the node tier (``syncdeco._plane.tier``, what
  syncdeco uses): a store per node, hosted by the node's main; only node
  mains (and rank 0's own node) meet rank 0 on the job's store.  The node
  stores are real TCPStore servers too, in one process of their own (its CPU
  per node store is reported), reached through the exchange's ``host_node``
  and ``join_node`` hooks.

Per sync point it reports the latency of ``sync()`` (median, p90) on the
main and on the members, back to back; the main's time to collect every
frame when all members are already waiting; the store server's CPU time;
the requests to the store; and the main's round trips.  Then the steady
load of ranks that wait at a sync point whose main does not come.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import multiprocessing as mp
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

HERE = Path(__file__).resolve().parent

SYNC_TIMEOUT: Final = 600.0  # seconds a simulated sync point may take before it fails
PHASE_TIMEOUT: Final = 900.0  # seconds the driver waits for a worker's answer
CONNECT_TIMEOUT: Final = timedelta(seconds=120)
NODE: Final = 8  # ranks a node

# Requests each store call costs on the wire (torch's TCPStore client): a
# get, a multi_get and a blocking queue_pop first wait for their keys (a
# request of its own), then read; set_timeout is local to the client.
WIRE: Final = {"get": 2, "multi_get": 2, "set_timeout": 0}
NO_REPLY: Final = frozenset({"set", "multi_set", "queue_push", "set_timeout"})

# (world size, rounds, back-to-back sync points a round, collect sync points a round)
PLAN: Final = [(16, 6, 20, 10), (128, 4, 10, 6), (1024, 2, 4, 3), (4096, 2, 3, 2)]
SMOKE_PLAN: Final = [(16, 1, 2, 2)]
WAIT_WINDOW: Final = 5.0

# The GIL's switch interval in the worker processes (CPython's default: 5 ms).
# A thread that wants the GIL waits for it in slices of this interval; at the
# end of each slice it wakes and asks the holder to let go, and the holder
# then waits until another thread has taken it.  With a thousand simulated
# ranks a process (and a watcher thread for each of their exchanges), every
# burst of ranks woken at once (a verdict, the watchers' once-a-second look)
# leaves hundreds of threads waiting: they wake 200 times a second each, the
# thread that holds the GIL is made to let go after a few bytecodes, the
# worker processes spend their time in the kernel, and the more threads wait
# the slower each hand-over gets.  At 4096 ranks a sync point then took 40 s
# to minutes, with the store server idle.  A thread that blocks on the store
# lets go of the GIL at once and wakes the next waiting thread anyway; the
# interval only makes a thread that computes let go sooner, which no
# simulated rank needs.  A real rank is a process of its own: no such crowd.
SWITCH_INTERVAL: Final = 1.0


# -- what a rank's store is ------------------------------------------------------


class Counted:
    """A store connection that counts what goes through it: requests on the
    wire, and those that wait for a reply (round trips)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.requests = 0
        self.replies = 0
        self.checks = 0  # looks whether a key is there (Nodes: a waiting node's looks)
        self.times: list[float] | None = None  # call times, while a phase records them

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.store, name)
        weight = WIRE.get(name, 1)
        replied = name not in NO_REPLY

        def call(*args: Any, **kwargs: Any) -> Any:
            n = weight
            if name == "queue_pop" and (kwargs.get("block", args[1] if len(args) > 1 else True)):
                n = 2
            self.requests += n
            if name == "check":
                self.checks += 1
            if replied:
                self.replies += n
            if self.times is not None:
                self.times.append(time.monotonic())
            return method(*args, **kwargs)

        return call

    def reset(self) -> None:
        self.requests = self.replies = self.checks = 0


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _server_cpu(pid: int) -> float:
    """CPU seconds the process ``pid`` has used, summed over its threads
    (schedstat: nanoseconds, unlike /proc/pid/stat's 10 ms ticks)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError), open(path) as f:
            total += int(f.read().split()[0])
    return total / 1e9


# -- the store server ------------------------------------------------------------


def _serve_nodes(conn: Connection, count: int) -> None:
    """One store server per simulated node, all in this process."""
    _raise_nofile()
    import torch.distributed as dist

    stores = [
        dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            use_libuv=True,
            timeout=CONNECT_TIMEOUT,
        )
        for _ in range(count)
    ]
    conn.send([s.port for s in stores])
    conn.poll(24 * 3600.0)
    del stores


def _serve(conn: Connection) -> None:
    _raise_nofile()
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        use_libuv=True,
        timeout=CONNECT_TIMEOUT,
    )
    conn.send(store.port)
    conn.poll(24 * 3600.0)  # until the driver says stop (or goes)
    del store


# -- a worker process: its share of the ranks --------------------------------------


@dataclass
class _Worker:
    index: int
    procs: int
    port: int
    server: int
    node_ports: list[int] = field(default_factory=list)  # node -> its store's port
    stores: dict[int, Any] = field(default_factory=dict)  # rank -> raw connection
    counted: dict[int, Counted] = field(default_factory=dict)
    node_counted: dict[int, Counted] = field(default_factory=dict)  # rank -> node store
    spare: Any = None
    exchanges: dict[str, dict[int, Any]] = field(default_factory=dict)
    world: int = 0

    def connect(self, ranks: Sequence[int]) -> float:
        import torch.distributed as dist

        def one(_: int) -> Any:
            return dist.TCPStore(
                "127.0.0.1",
                self.port,
                is_master=False,
                wait_for_workers=False,
                timeout=CONNECT_TIMEOUT,
            )

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, min(len(ranks) + 1, 128))) as pool:
            made = list(pool.map(one, range(len(ranks) + (self.index == 0))))
        if self.index == 0:
            self.spare = made.pop()
        self.stores = dict(zip(ranks, made, strict=True))
        self.counted = {r: Counted(s) for r, s in self.stores.items()}
        return time.monotonic() - start

    def setup(self, world: int) -> None:
        from _queues import Queues

        from syncdeco._plane.exchange import Exchange, Place
        from syncdeco._plane.transport import Keys

        self.exchanges = {}
        self.world = world
        self.node_counted = {}
        for design, transport in (("Keys", Keys), ("Queues", Queues), ("Nodes", Keys)):
            self.exchanges[design] = {
                r: Exchange(
                    self.counted[r],
                    r,
                    world,
                    Place(f"n{r // NODE}", r % NODE, NODE),
                    spare=self.spare if r == 0 else None,
                    broadcast=_no_broadcast,
                    transport=transport,
                    prefix=f"scale/{world}/{design}",
                    tiers=design == "Nodes",
                    host_node=functools.partial(self._host_node, r),
                    join_node=functools.partial(self._join_node, r),
                )
                for r in self.counted
                if r < world
            }
        # Two world sync points: the first meets flat, the second brings the
        # node tier up (connections to the node stores), before any timing.
        self.back_to_back("Nodes", 2)

    def _host_node(self, rank: int) -> tuple[Any, int]:
        """A node's main: its node's store (hosted by the node stores'
        process, not by this thread)."""
        port = self.node_ports[rank // NODE]
        return self._join_node(rank, port), port

    def _join_node(self, rank: int, port: int) -> Any:
        import torch.distributed as dist

        store = self.node_counted[rank] = Counted(
            dist.TCPStore(  # type: ignore[attr-defined]
                "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=CONNECT_TIMEOUT
            )
        )
        return store

    def _run(self, design: str, body: Callable[[int, Any], list[float]]) -> dict[str, Any]:
        """``body(rank, exchange)`` on a thread per rank of this worker."""
        exchanges = self.exchanges[design]
        times: dict[int, list[float]] = {}
        errors: list[str] = []
        for c in [*self.counted.values(), *self.node_counted.values()]:
            c.reset()

        def run(rank: int) -> None:
            try:
                times[rank] = body(rank, exchanges[rank])
            except BaseException:
                errors.append(f"rank {rank}: {traceback.format_exc()}")

        threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in exchanges]
        for t in threads:
            t.start()
        deadline = time.monotonic() + PHASE_TIMEOUT - 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                errors.append(f"worker {self.index}: a rank thread did not finish in time")
                break
        members = [x for r, ts in times.items() if r != 0 for x in ts[1:]]  # first: warm-up
        return {
            "errors": errors,
            "main": times.get(0),
            "members": members,
            "requests": sum(self.counted[r].requests for r in exchanges),
            "checks": sum(self.counted[r].checks for r in exchanges),
            "node_requests": sum(c.requests for c in self.node_counted.values()),
            "main_replies": self.counted[0].replies if 0 in exchanges else None,
        }

    def back_to_back(self, design: str, n: int) -> dict[str, Any]:
        def body(rank: int, ex: Any) -> list[float]:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                ex.sync(_point(ex), False, None, None, SYNC_TIMEOUT)
                out.append(time.perf_counter() - start)
            return out

        return self._run(design, body)

    def collect(self, design: str, n: int) -> dict[str, Any]:
        """Members enter each sync point at once; the main first waits (on
        its spare connection) until every member's frame is there, then
        times its own ``sync()``: the time to collect and answer them."""
        from _queues import Queues

        from syncdeco._plane.transport import Keys

        probe = (Queues if design == "Queues" else Keys)(self.spare) if self.index == 0 else None

        def body(rank: int, ex: Any) -> list[float]:
            out = []
            for _ in range(n):
                if rank == 0:
                    _all_there(probe, ex, time.monotonic() + SYNC_TIMEOUT)
                start = time.perf_counter()
                ex.sync(_point(ex), False, None, None, SYNC_TIMEOUT)
                out.append(time.perf_counter() - start)
            return out

        return self._run(design, body)

    def waiting(self, design: str, window: float) -> dict[str, Any]:
        """Every member waits at a sync point whose main comes ``window``
        seconds after the last of them arrived; the store calls made in
        that window are the waiting ranks' steady load."""
        from _queues import Queues

        from syncdeco._plane.transport import Keys

        probe = (Queues if design == "Queues" else Keys)(self.spare) if self.index == 0 else None
        span: list[float] = []
        for c in self.counted.values():
            c.times = []

        def body(rank: int, ex: Any) -> list[float]:
            if rank == 0:
                _all_there(probe, ex, time.monotonic() + SYNC_TIMEOUT)
                span.extend([time.monotonic(), _server_cpu(self.server)])
                time.sleep(window)  # the measured window, not a synchronisation
                span.extend([time.monotonic(), _server_cpu(self.server)])
            ex.sync(_point(ex), False, None, None, SYNC_TIMEOUT)
            return []

        try:
            result = self._run(design, body)
        finally:
            calls = [t for c in self.counted.values() for t in (c.times or ())]
            for c in self.counted.values():
                c.times = None
        result["calls"] = calls
        result["span"] = span
        return result


def _no_broadcast(tensor: Any, src: int) -> object:
    raise AssertionError("the scale benchmark's sync points carry no tensors")


def _point(ex: Any) -> Any:
    from syncdeco._backend import SyncPoint

    return SyncPoint("barrier", "scale", ex.seq["w"] + 1, "benchmarks/scale.py")


def _all_there(probe: Any, ex: Any, deadline: float) -> None:
    """Wait until every member's frame for the main's next sync point is in
    the store (asking only about those not yet seen)."""
    base, seq = f"{ex.prefix}/w/0", ex.seq["w"] + 1
    # With the node tier, rank 0 waits for its own node and the nodes' mains.
    missing = list(ex.tier.slots if ex.tier is not None else range(1, ex.world_size))
    while missing:
        here = set(probe.arrived(base, seq, missing))
        missing = [m for m in missing if m not in here]
        if missing and time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} members never reached sync #{seq}")
        if missing:
            time.sleep(0.002)


def _work(
    index: int,
    procs: int,
    port: int,
    server: int,
    node_ports: list[int],
    ranks: int,
    conn: Connection,
) -> None:
    _raise_nofile()
    threading.stack_size(512 * 1024)
    sys.setswitchinterval(SWITCH_INTERVAL)
    worker = _Worker(index, procs, port, server, node_ports)
    try:
        conn.send(("ok", worker.connect(range(index, ranks, procs))))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while conn.poll(PHASE_TIMEOUT):
        command, *args = conn.recv()
        if command == "stop":
            break
        try:
            result = getattr(worker, command)(*args)
            if isinstance(result, dict) and result["errors"]:
                conn.send(("error", "\n".join(result["errors"][:3])))
            else:
                conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    worker.exchanges.clear()


# -- the driver ---------------------------------------------------------------------


class Failed(Exception):
    pass


@dataclass
class Cell:
    """What one design measured at one world size."""

    main: list[float] = field(default_factory=list)
    members: list[float] = field(default_factory=list)
    collect: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # server seconds a sync point, per phase
    node_cpu: list[float] = field(default_factory=list)  # ... each node store's
    requests: list[float] = field(default_factory=list)
    checks: list[float] = field(default_factory=list)  # of those, looks for a key
    node_requests: list[float] = field(default_factory=list)  # each node store's
    trips: list[float] = field(default_factory=list)
    wait_rate: float | None = None  # requests a second by all waiting ranks
    wait_cpu: float | None = None  # server CPU seconds a second while they wait


class Driver:
    def __init__(self, procs: int, ranks: int) -> None:
        ctx = mp.get_context("spawn")
        self.ctx = ctx
        here, there = ctx.Pipe()
        self.server_conn = here
        self.server = ctx.Process(target=_serve, args=(there,), name="scale-store", daemon=True)
        self.server.start()
        if not here.poll(120):
            raise Failed("the store server did not start in 2 minutes")
        self.port = here.recv()
        assert self.server.pid is not None
        self.pid = self.server.pid
        self.nodes = max(1, ranks // NODE)
        here, there = ctx.Pipe()
        self.nodes_conn = here
        self.node_server = ctx.Process(
            target=_serve_nodes, args=(there, self.nodes), name="scale-node-stores", daemon=True
        )
        self.node_server.start()
        if not here.poll(300):
            raise Failed("the node stores did not start in 5 minutes")
        node_ports = here.recv()
        assert self.node_server.pid is not None
        self.node_pid = self.node_server.pid
        self.conns: list[Connection] = []
        self.workers: list[Any] = []
        for i in range(procs):
            here, there = ctx.Pipe()
            p = ctx.Process(
                target=_work,
                args=(i, procs, self.port, self.pid, node_ports, ranks, there),
                name=f"scale-ranks-{i}",
                daemon=True,
            )
            p.start()
            self.conns.append(here)
            self.workers.append(p)
        self.connect_s = max(self.gather())

    def ask(self, *command: Any) -> list[Any]:
        for c in self.conns:
            c.send(command)
        return self.gather()

    def gather(self) -> list[Any]:
        out = []
        for i, c in enumerate(self.conns):
            if not c.poll(PHASE_TIMEOUT):
                raise Failed(f"worker {i} gave no answer in {PHASE_TIMEOUT:.0f}s")
            try:
                status, value = c.recv()
            except EOFError:
                raise Failed(f"worker {i} died (exit code {self.workers[i].exitcode})") from None
            if status != "ok":
                raise Failed(f"worker {i} failed:\n{value}")
            out.append(value)
        return out

    def phase(self, cell: Cell, kind: str, design: str, n: int, world: int) -> None:
        cpu, node_cpu = _server_cpu(self.pid), _server_cpu(self.node_pid)
        results = self.ask(kind, design, n)
        cpu = _server_cpu(self.pid) - cpu
        node_cpu = _server_cpu(self.node_pid) - node_cpu
        main = next(r["main"] for r in results if r["main"] is not None)
        if kind == "collect":
            cell.collect += main
            return
        cell.main += main[1:]  # the first sync point of a phase absorbs the start
        cell.members += [x for r in results for x in r["members"]]
        cell.cpu.append(cpu / n)
        cell.requests.append(sum(r["requests"] for r in results) / n)
        cell.checks.append(sum(r["checks"] for r in results) / n)
        if design == "Nodes":
            nodes = world // NODE
            cell.node_cpu.append(node_cpu / n / nodes)
            cell.node_requests.append(sum(r["node_requests"] for r in results) / n / nodes)
        cell.trips.append(next(r["main_replies"] for r in results if r["main"] is not None) / n)

    def waiting(self, cell: Cell, design: str, window: float) -> None:
        results = self.ask("waiting", design, window)
        t0, cpu0, t1, cpu1 = next(r["span"] for r in results if r["span"])
        calls = sum(1 for r in results for t in r["calls"] if t0 <= t <= t1)
        cell.wait_rate = calls / (t1 - t0)
        cell.wait_cpu = (cpu1 - cpu0) / (t1 - t0)

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("stop",))
        for conn in (self.server_conn, self.nodes_conn):
            with contextlib.suppress(OSError):
                conn.send("stop")
        for p in [*self.workers, self.server, self.node_server]:
            p.join(60)
            if p.is_alive():
                print(f"{p.name} did not exit in 60s: killing it", file=sys.stderr)
                p.kill()
                p.join(10)


# -- the report -------------------------------------------------------------------------


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _p90(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}" if x == x else "-"


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2g}x" if b > 0 and a == a and b == b else "-"


DESIGNS: Final = ("Queues", "Keys", "Nodes")
POLL_NOTE: Final = "4 s or more (at most two a node every 4 s, while waiting)"
LABEL: Final = {
    "Queues": "Queues (flat star, <= 0.1)",
    "Keys": "Keys (batched flat star)",
    "Nodes": "Nodes (a store per node, 0.2)",
}


def report(cells: dict[tuple[int, str], Cell], sizes: Sequence[int], procs: int) -> str:
    lines = [
        "Per sync point; latencies in ms, median / p90; job store CPU = the job's "
        "store server's CPU per sync point (the busiest server); requests = all "
        "ranks' requests to the job's store; main trips = rank 0's requests that "
        "wait for a reply, one after another; node store = each node's own store "
        "(Nodes only: its CPU and requests per sync point, averaged over the nodes).",
        "",
        "| ranks | design | main, back to back | members, back to back "
        "| main collects, all waiting | job store CPU ms | requests | main trips "
        "| node store CPU ms | node store requests |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in sizes:
        for d in DESIGNS:
            c = cells[(w, d)]
            node = d == "Nodes"
            lines.append(
                f"| {w} | {LABEL[d]} | {_ms(_med(c.main))} / {_ms(_p90(c.main))} "
                f"| {_ms(_med(c.members))} / {_ms(_p90(c.members))} "
                f"| {_ms(_med(c.collect))} / {_ms(_p90(c.collect))} "
                f"| {_ms(_med(c.cpu))} | {_n(_med(c.requests))} | {_n(_med(c.trips))} "
                f"| {_ms(_med(c.node_cpu)) if node else '-'} "
                f"| {_n(_med(c.node_requests)) if node else '-'} |"
            )
    lines += [
        "",
        "Of the Nodes requests to the job's store, looks for a verdict by nodes whose sync "
        f"point had waited {POLL_NOTE}: "
        + ", ".join(f"{_n(_med(cells[(w, 'Nodes')].checks))} at {w} ranks" for w in sizes)
        + " (a real sync point that takes milliseconds makes none).",
        "",
        "How many times more the flat stars cost than Nodes (Queues / Nodes, Keys / Nodes):",
        "",
        "| ranks | main, back to back | main collects, all waiting | job store CPU "
        "| requests | main trips |",
        "|---|---|---|---|---|---|",
    ]
    for w in sizes:
        q, k, n = cells[(w, "Queues")], cells[(w, "Keys")], cells[(w, "Nodes")]

        def both(field: str, q: Cell = q, k: Cell = k, n: Cell = n) -> str:
            m = _med(getattr(n, field))
            return f"{_ratio(_med(getattr(q, field)), m)}, {_ratio(_med(getattr(k, field)), m)}"

        lines.append(
            f"| {w} | {both('main')} | {both('collect')} | {both('cpu')} "
            f"| {both('requests')} | {both('trips')} |"
        )
    return "\n".join(lines)


def targets(cells: dict[tuple[int, str], Cell], sizes: Sequence[int], waited: int) -> str:
    top = max(sizes)
    q, n = cells[(top, "Queues")], cells[(top, "Nodes")]
    cpu_q, cpu_n = _med(q.cpu), _med(n.cpu)
    collect = _med(n.collect)
    nodes = waited // NODE
    lines = [f"Targets (issue 10), at {top} simulated ranks, Nodes against Queues:", ""]

    def say(ok: bool, text: str, why: str = "") -> None:
        lines.append(f"- {'MET' if ok else 'NOT MET'}: {text}{'' if ok else why}")

    say(
        cpu_n <= cpu_q / 10,
        f"the busiest store server (the job's) spends at most 1/10 of the flat star's CPU "
        f"a sync point: Nodes {_ms(cpu_n)} ms against Queues {_ms(cpu_q)} ms "
        f"({_ratio(cpu_q, cpu_n)} less; Keys {_ms(_med(cells[(top, 'Keys')].cpu))} ms). "
        f"Each node's store: {_ms(_med(n.node_cpu))} ms.",
        f" The job's store gets "
        f"{_ratio(_med(q.requests), _med(n.requests))} fewer requests, but each costs it "
        f"more (one bigger frame per node, fewer requests to batch per wake-up), and "
        f"nodes whose simulated sync point waits 4 s or more look at it (above).",
    )
    say(
        collect <= 0.005,
        f"rank 0 collects every frame, all ranks waiting, in at most 5 ms: "
        f"Nodes {_ms(collect)} ms (Queues {_ms(_med(q.collect))} ms, "
        f"Keys {_ms(_med(cells[(top, 'Keys')].collect))} ms).",
        f" Rank 0 reads {top // NODE} node frames (their agreeing ranks in groups: "
        f"about 2 ms of Python alone), after a wait and a read of the store and "
        f"before answering; here its thread may also wait for its process's GIL "
        f"behind the simulated ranks the verdict wakes (not broken down).",
    )
    nw = cells[(waited, "Nodes")]
    rate = nw.wait_rate if nw.wait_rate is not None else float("nan")
    say(
        rate <= nodes,
        f"waiting ranks load the job's store with at most one request per node per second: "
        f"Nodes {rate:.3g} requests/s from {waited - 1} waiting ranks ({nodes} nodes).",
    )
    return "\n".join(lines)


def waiting_text(cells: dict[tuple[int, str], Cell], waited: int, window: float) -> str:
    lines = [
        f"Waiting ranks' steady load on the job's store: {waited - 1} ranks wait at a "
        f"sync point whose main comes {window:.0f}s later (watchers running):",
        "",
        "| design | requests/s, all waiting ranks | per waiting rank | job store CPU, ms/s |",
        "|---|---|---|---|",
    ]
    for d in DESIGNS:
        c = cells[(waited, d)]
        rate = c.wait_rate or 0.0
        lines.append(
            f"| {LABEL[d]} | {rate:.3g} | {rate / (waited - 1):.3g} "
            f"| {(c.wait_cpu or 0.0) * 1e3:.3g} |"
        )
    return "\n".join(lines)


CAVEATS: Final = """\
What a 2-core machine can show, and what it cannot: every simulated rank's
client runs on the same few cores as the store server, so latencies include
waiting for a CPU and are pessimistic; they compare the designs here and do
not transfer to a cluster.  The store server's CPU time per sync point and
the requests per sync point do not depend on where the clients run: they are
the figures that transfer to a real job (the server is one thread; a real
network adds a round trip per main trip, one after another).  Requests are
counted by a proxy around each rank's store, at torch's Python store API,
weighted to requests on the wire: get, multi_get and a blocking queue_pop
cost two (a wait, then the read), set_timeout none.  The node stores
(Nodes) are all hosted by one process; its CPU divided by the number of
nodes is each node store's.  The steady load counts what the exchange and
its watcher send; the dead-process detection (group.py: each rank watches
its node's other processes through the kernel, with pidfds) sends nothing
while all is well, and is not simulated here."""


def plot(cells: dict[tuple[int, str], Cell], sizes: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"Queues": ("tab:red", "o"), "Keys": ("tab:blue", "s"), "Nodes": ("tab:green", "^")}
    for d in DESIGNS:
        color, marker = style[d]
        main = [_med(cells[(w, d)].main) * 1e3 for w in sizes]
        coll = [_med(cells[(w, d)].collect) * 1e3 for w in sizes]
        lat.plot(sizes, main, color=color, marker=marker, label=f"{d}: back to back")
        lat.plot(
            sizes, coll, color=color, marker=marker, ls="--", label=f"{d}: collect, all waiting"
        )
        cpu.plot(
            sizes,
            [_med(cells[(w, d)].cpu) * 1e3 for w in sizes],
            color=color,
            marker=marker,
            label=f"{d}: job store",
        )
    cpu.plot(
        sizes,
        [_med(cells[(w, "Nodes")].node_cpu) * 1e3 for w in sizes],
        color=style["Nodes"][0],
        marker=style["Nodes"][1],
        ls="--",
        label="Nodes: each node's store",
    )
    lat.axhline(5, color="gray", lw=0.8, ls=":", label="target: collect <= 5 ms")
    for ax, title, unit in (
        (lat, "main rank's sync() latency (median)", "ms"),
        (cpu, "store server CPU per sync point (the figure that transfers)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(sizes), [str(s) for s in sizes])
        ax.set_xlabel("simulated ranks (nodes of 8)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "syncdeco sync plane, simulated ranks on real TCPStores (2-core machine)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="16 ranks, 2 sync points a design")
    parser.add_argument("--procs", type=int, default=None, help="worker processes")
    parser.add_argument("--sizes", type=str, default=None, help="world sizes, e.g. 16,128")
    parser.add_argument("--png", type=Path, default=HERE / "scale.png")
    args = parser.parse_args(list(argv) if argv is not None else None)

    plan = SMOKE_PLAN if args.smoke else PLAN
    if args.sizes:
        wanted = {int(s) for s in args.sizes.split(",")}
        plan = [p for p in PLAN + SMOKE_PLAN if p[0] in wanted][: len(wanted)]
    sizes = [p[0] for p in plan]
    cores = os.cpu_count() or 1
    procs = args.procs or (1 if args.smoke else min(8, max(2, 2 * cores)))
    window = 1.0 if args.smoke else WAIT_WINDOW
    _raise_nofile()
    # Each new connection's failed reverse lookup of 127.0.0.1 logs a warning;
    # where no name server answers, each such lookup stalls the connection
    # 5 s (or 10): the spawned processes ask the resolver to give up in 1 s.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
    print(
        f"# syncdeco scale benchmark: {', '.join(map(str, sizes))} simulated ranks, "
        f"{procs} worker processes, {cores} cores, one libuv TCPStore server process\n"
    )
    driver = Driver(procs, max(sizes))
    print(f"{max(sizes)} store connections opened in {driver.connect_s:.1f}s (not timed)\n")
    cells = {(w, d): Cell() for w in sizes for d in DESIGNS}
    status = 0
    try:
        for w, rounds, n_b2b, n_collect in plan:
            start = time.monotonic()
            driver.ask("setup", w)
            for r in range(rounds):
                for d in DESIGNS if r % 2 == 0 else DESIGNS[::-1]:
                    driver.phase(cells[(w, d)], "back_to_back", d, n_b2b + 1, w)
                    driver.phase(cells[(w, d)], "collect", d, n_collect, w)
            if w == max(sizes):
                for d in DESIGNS:
                    driver.waiting(cells[(w, d)], d, window)
            print(f"{w} ranks measured in {time.monotonic() - start:.0f}s", flush=True)
            rows = [r for r in report(cells, [w], procs).splitlines() if r.startswith(f"| {w} |")]
            print("\n".join(rows[: len(DESIGNS)]), flush=True)
    except Failed as exc:
        print(f"scale benchmark failed: {exc}", file=sys.stderr)
        status = 1
    finally:
        driver.close()
    if status:
        return status
    print()
    print(report(cells, sizes, procs))
    print()
    print(waiting_text(cells, max(sizes), window))
    print()
    print(targets(cells, sizes, max(sizes)))
    print()
    print(CAVEATS)
    plot(cells, sizes, args.png)
    print(f"\nplot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
