"""How long ``python -m syncdeco where`` takes, and what it costs the store.

    python benchmarks/where.py              # 16, 128 and 1024 simulated ranks
    python benchmarks/where.py --smoke      # 16 simulated ranks, one round (seconds)
    python benchmarks/where.py --real 16    # a real 16-rank torchrun job (Gloo, one host)

Simulated: each rank is syncdeco's own ``StackResponder`` (the product
code) in a thread with its own TCPStore client connection, ranks spread
over a few worker processes, against one real TCPStore server (libuv) in a
process of its own so that its CPU time can be read.  Each rank's store
holds the keys a real rank's exchange writes as it joins (its pid, its
node), under the prefix a torchrun job's ranks use.  The sizes run side by
side, and the queries go round robin over them (interleaved rounds): each
query is what the command does once it has a store address (``where``'s
``connect``, ``jobs_in``, ``choose`` and ``ask``), timed from the
connection to the last answer read.  Reported per query: its wall time
(median, and the range over rounds), the store server's CPU time, and the
requests sent to the store, by the asker and by the responders.

Real: a torchrun job of N ranks (tests/scripts/where_job.py: rank 3 stuck
in a function of its own, the others in a Gloo ``all_reduce``), and the
command itself run against it (``--pid``, as found from /proc, and
``--store``), timed from its start to its exit: Python and torch's import
included, which on a loaded 2-core machine dominate.  The store server's
CPU per query is that of torchrun's agent, which hosts it.

On a machine shared with other work (2 cores here), wall times vary from
run to run; the store server's CPU time and the request counts are what
carry over to a cluster.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from scale import Counted, _raise_nofile, _serve, _server_cpu  # noqa: E402

SIZES: Final = (16, 128, 1024)
ROUNDS: Final = 5
RANKS_A_WORKER: Final = 256
NAMESPACE: Final = "syncdeco-job/TORCHELASTIC_RUN_ID=bench,TORCHELASTIC_RESTART_COUNT=0/"
START: Final = 300.0  # seconds for a job (real or simulated) to be ready


# -- simulated ranks ----------------------------------------------------------------


def _ranks(conn: Connection, port: int, ranks: Sequence[int], world: int) -> None:
    """A worker process: the responders of ``ranks``."""
    _raise_nofile()
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    import torch.distributed as dist

    from syncdeco._plane.stacks import StackResponder, SyncSeen

    def client(rank: int) -> Any:
        tcp = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", port, None, False, timedelta(seconds=120), wait_for_workers=False
        )
        store = dist.PrefixStore(NAMESPACE, tcp)  # type: ignore[attr-defined]
        store.set(f"syncdeco/pid/{rank}", str(os.getpid()))  # what an exchange writes
        store.set(f"syncdeco/node/n{rank // 8}/{rank % 8}", str(rank))
        store.set(f"syncdeco/topo/{rank}", pickle.dumps((f"n{rank // 8}", rank % 8)))
        return store

    with ThreadPoolExecutor(max_workers=64) as pool:  # connecting one by one is slow
        stores = list(pool.map(client, ranks))
    sys.setswitchinterval(1.0)  # a thousand threads: see scale.py's SWITCH_INTERVAL
    seen = SyncSeen("barrier 'epoch' (call 3, train.py:70)", 1.0, False)
    counted: list[Counted] = []
    responders = []
    for rank, store in zip(ranks, stores, strict=True):
        mine = Counted(store)
        counted.append(mine)
        responder = StackResponder(
            mine, "syncdeco/stack", rank, world_size=world, sync=lambda: seen
        )
        responder.start()
        responders.append(responder)
    for responder in responders:
        responder._ready.wait(START)
    conn.send("ready")
    while True:
        what = conn.recv()
        if what == "count":
            conn.send(sum(c.requests for c in counted))
            for c in counted:
                c.reset()
        else:
            break
    os._exit(0)  # the responders wait in the store: no teardown needed


class Simulated:
    """A simulated job of ``world`` ranks: its store server and workers."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        here, there = ctx.Pipe()
        self.server = ctx.Process(target=_serve, args=(there,), daemon=True)
        self.server.start()
        self.port = here.recv()
        self.server_conn = here
        self.workers: list[tuple[Any, Connection]] = []
        count = max(1, -(-world // RANKS_A_WORKER))
        for i in range(count):
            mine, theirs = ctx.Pipe()
            share = list(range(i, world, count))
            proc = ctx.Process(target=_ranks, args=(theirs, self.port, share, world), daemon=True)
            proc.start()
            self.workers.append((proc, mine))

    def wait_ready(self) -> None:
        for _, conn in self.workers:
            if not conn.poll(START):
                raise SystemExit(f"the {self.world} simulated ranks were not ready in {START}s")
            assert conn.recv() == "ready"

    def responder_requests(self) -> int:
        for _, conn in self.workers:
            conn.send("count")
        return sum(conn.recv() for _, conn in self.workers)

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.server_conn.send("stop")
        self.server.join(10)
        if self.server.is_alive():
            self.server.kill()


def _query(job: Simulated) -> dict[str, float]:
    from syncdeco._where import ask, choose, connect, jobs_in

    at = f"127.0.0.1:{job.port}"
    job.responder_requests()  # start counting from here
    cpu = _server_cpu(job.server.pid or 0)
    began = time.monotonic()
    store = Counted(connect("127.0.0.1", job.port))
    picked = choose(jobs_in(store, at), at)
    found = time.monotonic() - began
    seen = ask(store, picked)
    took = time.monotonic() - began
    answered = sum(r.answered for r in seen.reports.values())
    if answered != job.world:
        raise SystemExit(f"{job.world - answered} of {job.world} simulated ranks did not answer")
    asker = store.requests
    keys = store.store.num_keys()
    responders = job.responder_requests()  # once they have written their answers
    return {
        "wall": took,
        "find": found,
        "ask": took - found,
        "cpu": _server_cpu(job.server.pid or 0) - cpu,
        "asker": asker,
        "responders": responders,
        "keys": keys,
    }


def _range(xs: Sequence[float], scale: float = 1e3) -> str:
    return f"{statistics.median(xs) * scale:7.1f} [{min(xs) * scale:.1f}-{max(xs) * scale:.1f}]"


def simulated(sizes: Sequence[int], rounds: int) -> str:
    jobs = [Simulated(w) for w in sizes]
    try:
        for job in jobs:
            job.wait_ready()
        results: dict[int, list[dict[str, float]]] = {w: [] for w in sizes}
        for _ in range(rounds):
            for job in jobs:  # interleaved: each round asks every size once
                results[job.world].append(_query(job))
    finally:
        for job in jobs:
            job.close()
    base = statistics.median(r["wall"] for r in results[sizes[0]])
    lines = [
        f"where against simulated ranks ({rounds} interleaved rounds; median [min-max]; "
        f"store keys listed once per query)",
        f"{'ranks':>6} {'wall ms':>22} {'x':>6} {'finding ms':>20} {'asking ms':>22} "
        f"{'server CPU ms':>20} {'asker req':>10} {'responder req':>14} {'keys':>7}",
    ]
    for w in sizes:
        rs = results[w]
        wall = [r["wall"] for r in rs]
        lines.append(
            f"{w:>6} {_range(wall):>22} {statistics.median(wall) / base:>6.1f} "
            f"{_range([r['find'] for r in rs]):>20} {_range([r['ask'] for r in rs]):>22} "
            f"{_range([r['cpu'] for r in rs]):>20} "
            f"{statistics.median(r['asker'] for r in rs):>10.0f} "
            f"{statistics.median(r['responders'] for r in rs):>14.0f} "
            f"{statistics.median(r['keys'] for r in rs):>7.0f}"
        )
    return "\n".join(lines)


# -- a real job -------------------------------------------------------------------


def real(world: int, rounds: int) -> str:
    from syncdeco._jobs import children

    script = ROOT / "tests" / "scripts" / "where_job.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="where-bench-"))
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
         "--master-port", str(port), str(script), str(folder)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pids: list[int] = []
    try:
        deadline = time.monotonic() + START
        while len(list(folder.glob("ready-*"))) < world:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {world}-rank job did not get ready")
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in folder.glob("ready-*")]
        rank0 = int((folder / "ready-0").read_text())
        commands = {
            "--pid": ["-m", "syncdeco", "where", "--pid", str(rank0)],
            "--store": ["-m", "syncdeco", "where", "--store", f"127.0.0.1:{port}"],
            "import": ["-c", "import syncdeco._where"],  # the peer: Python, torch, syncdeco
        }
        rows: dict[str, list[tuple[float, float, float]]] = {how: [] for how in commands}
        for _ in range(rounds):
            for how, args in commands.items():
                cpu = _server_cpu(agent.pid)
                began = time.monotonic()
                done = subprocess.run(
                    [sys.executable, *args],
                    env=env, capture_output=True, text=True, timeout=120, check=False,
                )  # fmt: skip
                took = time.monotonic() - began
                if done.returncode != 0:
                    raise SystemExit(done.stderr)
                asked = re.search(r"asked in (\d+) ms", done.stdout)
                rows[how].append(
                    (took, float(asked[1]) / 1e3 if asked else 0.0, _server_cpu(agent.pid) - cpu)
                )
    finally:
        for pid in {*pids, *children(agent.pid)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    lines = [
        f"python -m syncdeco where on a real {world}-rank torchrun job (Gloo, one host; "
        f"{rounds} interleaved rounds; median [min-max])",
        f"{'how':>8} {'command s':>20} {'asking ms':>20} {'agent CPU ms':>20}",
    ]
    for how, rs in rows.items():
        lines.append(
            f"{how:>8} {_range([r[0] for r in rs], 1):>20} {_range([r[1] for r in rs]):>20} "
            f"{_range([r[2] for r in rs]):>20}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="16 simulated ranks, one round")
    parser.add_argument(
        "--real", type=int, metavar="N", help="a real torchrun job of N ranks (4 or more)"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    if args.real is not None and args.real < 4:
        parser.error(f"--real {args.real}: the job needs 4 ranks or more (rank 3 is the stuck one)")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.real:
        print(real(args.real, args.rounds))
    elif args.smoke:
        print(simulated((16,), 1))
    else:
        print(simulated(SIZES, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
