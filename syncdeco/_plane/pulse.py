"""A node's pulse: the process that renews its node's lease (see ``lease.py``).

The main rank of each node of a job that spans several starts one
(:func:`start`), with the job's store's address and this node's name.  It

* connects to the job's store as a client (no socket of its own listens),
  with the keepalive of ``keepalive.py``, so it ends soon after the store's
  host is lost;
* renews the node's lease every :data:`lease.PERIOD` seconds: a count that
  moves, the host name and the node's ranks;
* watches the processes of the node's ranks through their pidfds (the main
  hands it each rank's pid on its standard input as it learns them), and
  once they have all ended, leaves the lease saying so and exits: at the
  end of a job, or where a rank alone on its host was killed, the watcher
  then reports them within a look, instead of finding a lease gone still.

It is a process so that nothing a rank does (a C call that holds the GIL
for minutes, SIGSTOP, a debugger) can silence it: only the loss of its node
does, or the end of every rank it serves.  It runs without the launcher's
variables, so that syncdeco in it never takes it for a rank.

Costs: one store request per renewal (2/3 of a request per node and second)
and one Python process per node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import IO, Any, Final

__all__ = ["LAUNCHER_VARIABLES", "Pulse", "lease_key", "start"]

LIST: Final = "pulses"  # the key listing every node that has a pulse: "node main-rank" lines
CONNECT_TIMEOUT: Final = 30.0  # seconds the pulse tries to reach the job's store
_ATTEMPT: Final = 1.0  # seconds of one try (between them, it looks whether its main lives)

# The variables that would make syncdeco take the pulse for a rank.
LAUNCHER_VARIABLES: Final = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


def lease_key(node: str) -> str:
    return f"pulse/{node}"


class Pulse:
    """The handle a node's main keeps on its node's pulse."""

    __slots__ = ("_lock", "_proc", "_sent")

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._sent: set[int] = set()

    def serve(self, ranks: Mapping[int, int]) -> None:
        """Have the pulse watch these ranks (rank -> pid on this host) too."""
        with self._lock:
            new = {r: p for r, p in ranks.items() if r not in self._sent}
            stdin = self._proc.stdin
            if not new or stdin is None or stdin.closed:
                return
            try:
                stdin.write("".join(f"{r} {p}\n" for r, p in new.items()).encode())
                stdin.flush()
            except (OSError, ValueError):
                return  # the pulse has ended (its store is gone)
            self._sent |= set(new)

    @property
    def pid(self) -> int:
        return self._proc.pid


def start(
    store_host: str, store_port: int, namespace: str, node: str, rank: int, env: Mapping[str, str]
) -> Pulse:
    """Start this node's pulse, serving this process as ``rank`` (the node's
    main).  Keys go under ``namespace`` on the job's TCP store."""
    clean = {k: v for k, v in env.items() if k not in LAUNCHER_VARIABLES}
    clean["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "syncdeco._plane.pulse"]
    argv += [store_host, str(store_port), namespace, node, str(rank), str(os.getpid())]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # torch's client logs; the pulse has nothing to say
        env=clean,
        start_new_session=False,
        close_fds=True,
    )
    return Pulse(proc)


# -- in the pulse's own process ------------------------------------------------------


def _serve(argv: Sequence[str], stdin: IO[bytes]) -> int:
    import select
    import socket
    import time

    import torch.distributed as dist

    from . import keepalive, lease
    from .deathwatch import DeathWatch

    host, port, namespace, node, main, parent = argv
    store_port, main_rank, parent_pid = int(port), int(main), int(parent)
    try:
        parent_fd = os.pidfd_open(parent_pid)
    except OSError:
        return 1  # no pidfds here (or the main has ended already): nothing to serve
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        if select.select([parent_fd], [], [], 0)[0]:
            return 0  # the main ended before the pulse could start serving
        try:
            tcp = dist.TCPStore(  # type: ignore[attr-defined]
                host,
                store_port,
                is_master=False,
                wait_for_workers=False,
                timeout=timedelta(seconds=_ATTEMPT),
            )
            break
        except Exception:
            if time.monotonic() > deadline:
                return 1  # the job's store is gone: nothing to renew
    os.close(parent_fd)
    keepalive.keep_alive(host, store_port)
    store: Any = dist.PrefixStore(namespace, tcp)  # type: ignore[attr-defined]
    name = socket.gethostname()
    key = lease_key(node)
    lock = threading.Lock()
    changed = threading.Event()
    ranks: dict[int, int] = {}  # rank -> pid, every rank served
    living: set[int] = set()

    def on_death(rank: int) -> None:
        with lock:
            living.discard(rank)
        changed.set()

    watch = DeathWatch(on_death, name="syncdeco-pulse-watch")

    def add(rank: int, pid: int) -> None:
        with lock:
            ranks[rank] = pid
            living.add(rank)
        watch.watch(rank, pid)

    def read_stdin() -> None:
        for line in stdin:
            parts = line.split()
            if len(parts) == 2:
                add(int(parts[0]), int(parts[1]))
        # The main closed its end: it has ended (its pidfd says so too).

    add(main_rank, parent_pid)
    threading.Thread(target=read_stdin, name="syncdeco-pulse-stdin", daemon=True).start()
    count = 0
    try:
        store.set(key, lease.alive(count, name, ranks))
        store.append(LIST, f"{node} {main_rank}\n")
        while True:
            changed.wait(lease.PERIOD)
            changed.clear()
            with lock:
                over, served = not living, sorted(ranks)
            if over:
                store.set(key, lease.ended(name, served))
                return 0
            count += 1
            store.set(key, lease.alive(count, name, served))
    except Exception:
        return 1  # the job's store is gone (its host lost, or the job over)
    finally:
        watch.close()


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:], sys.stdin.buffer))
