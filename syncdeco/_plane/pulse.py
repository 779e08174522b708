"""A node's pulse: the process that renews its node's lease (see ``lease.py``).

The main rank of each node of a job that spans several starts one
(:func:`start`), with the job's store's address and this node's name.  It

* connects to the job's store as a client (no socket of its own listens),
  with the keepalive of ``keepalive.py``, so it ends soon after the store's
  host is lost;
* renews the node's lease every :data:`lease.PERIOD` seconds: a count that
  moves, the host name and the node's ranks;
* waits, on a second connection of its own, for the job's loss mark
  (:data:`MARK`, which a rank that ends through fail-fast writes, see
  :func:`mark`): a store ``wait``, which costs no request while it waits,
  and which the store answers the moment the mark is written.  The pulse
  then hands the mark (that rank's fail-fast note) to its main on a pipe
  of their own (the main ends, and its node's other ranks after it, see
  ``failfast``), and says it has (:func:`heard_key`);
* watches the processes of the node's ranks through their pidfds (the main
  hands it each rank's pid on its standard input as it learns them), and
  once they have all ended, leaves the lease saying so and exits: at the
  end of a job, or where a rank alone on its host was killed, the watcher
  then reports them within a look, instead of finding a lease gone still.

It is a process so that nothing a rank does (a C call that holds the GIL
for minutes, SIGSTOP, a debugger) can silence it: only the loss of its node
does, or the end of every rank it serves.  It is forked from the node's
main, so it costs no second import of torch.

Costs: one store request per renewal (2/3 of a request per node and second),
one Python process per node, and one more connection to the job's store
per node, idle in its wait.  At a loss, the rank that marks sends one
request, and each pulse two (it reads the mark and says it heard it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import timedelta
from typing import IO, Any, Final

from . import lease

__all__ = [
    "MARK",
    "Pulse",
    "awaited",
    "heard_key",
    "lease_key",
    "linger",
    "listen",
    "mark",
    "start",
]

LIST: Final = "pulses"  # the key listing every node that has a pulse: "node main-rank" lines
MARK: Final = "pulses-mark"  # the job's loss mark: the fail-fast note of the rank that heard first
CONNECT_TIMEOUT: Final = 30.0  # seconds the pulse tries to reach the job's store
_ATTEMPT: Final = 1.0  # seconds of one try (between them, it looks whether its main lives)
_LINGER_LOOK: Final = 0.05  # seconds between two looks for pulses that have not heard yet
_LISTEN: Final = timedelta(days=30)  # one wait for the mark (then another)


def lease_key(node: str) -> str:
    return f"pulse/{node}"


def heard_key(node: str) -> str:
    """Set by ``node``'s pulse once it has handed the mark to its main."""
    return f"pulse-heard/{node}"


class Pulse:
    """The handle a node's main keeps on its node's pulse."""

    __slots__ = ("_lock", "_news", "_pipe", "_sent", "pid")

    def __init__(self, pid: int, pipe: IO[bytes], news: int) -> None:
        self.pid = pid
        self._pipe = pipe
        self._news = news
        self._lock = threading.Lock()
        self._sent: set[int] = set()

    def serve(self, ranks: Mapping[int, int]) -> None:
        """Have the pulse watch these ranks (rank -> pid on this host) too."""
        with self._lock:
            new = {r: p for r, p in ranks.items() if r not in self._sent}
            if not new or self._pipe.closed:
                return
            try:
                self._pipe.write("".join(f"{r} {p}\n" for r, p in new.items()).encode())
                self._pipe.flush()
            except (OSError, ValueError):
                return  # the pulse has ended (its store is gone)
            self._sent |= set(new)

    def close(self) -> None:
        """Stop feeding it (it serves the ranks it knows until they end)."""
        with self._lock, contextlib.suppress(OSError):
            self._pipe.close()

    def hear(self, told: Callable[[bytes], None]) -> None:
        """Pass the job's loss mark to ``told`` (a fail-fast note, JSON)
        once the pulse has heard it, until the pulse ends; in a thread of
        its own, blocked in a read (of the descriptor itself: a daemon
        thread blocked in a buffered file's read at interpreter exit would
        make its finalization abort)."""
        pending = b""
        while True:
            try:
                chunk = os.read(self._news, 65536)
            except OSError:
                return
            if not chunk:
                return  # the pulse has ended
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    told(line.strip())


def start(store_host: str, store_port: int, namespace: str, node: str, rank: int) -> Pulse:
    """Start this node's pulse, serving this process as ``rank`` (the node's
    main); keys go under ``namespace`` on the job's TCP store.

    The pulse is forked, not spawned, so that it starts at once, without
    importing torch again; call it before this process starts threads of
    its own.  In the child only the pipe from its main stays open (so that
    the main's connections close when the main ends), and it leaves with
    ``os._exit``: none of the main's exit handlers run there."""
    read, write = os.pipe()
    news, tell = os.pipe()  # the other way: the loss mark, once the pulse heard it
    pid = os.fork()
    if pid == 0:  # the pulse
        code = 1
        try:
            _only(read, tell)
            argv = [store_host, str(store_port), namespace, node, str(rank), str(os.getppid())]
            code = _serve(argv, os.fdopen(read, "rb"), tell)
        finally:
            os._exit(code)
    os.close(read)
    os.close(tell)
    threading.Thread(target=_reap, args=(pid,), name="syncdeco-pulse-reap", daemon=True).start()
    return Pulse(pid, os.fdopen(write, "wb"), news)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def mark(store: Any, loss: bytes) -> bool:
    """Write the job's loss mark, ``loss`` (a fail-fast note, JSON), over
    ``store`` (the pulses' namespace), unless another rank wrote one first:
    one request, whatever the number of nodes; every pulse's wait ends.
    Returns whether this one was first."""
    return bytes(store.compare_set(MARK, "", loss)) == loss


def listen(store: Any, node: str, told: Callable[[bytes], None]) -> None:
    """In ``node``'s pulse, on a connection of its own: wait for the job's
    loss mark, hand it to ``told``, and say so.  Returns once heard, or
    when the store is gone."""
    while True:
        try:
            store.wait([MARK], _LISTEN)
            break
        except Exception as exc:
            if "timeout" not in str(exc).lower():
                return  # the store is gone
    try:
        told(bytes(store.get(MARK)))
        store.set(heard_key(node), b"1")
    except Exception:
        return


def linger(store: Any, skip: Collection[str], seconds: float, lost: Collection[int] = ()) -> bool:
    """Wait (``seconds`` at most) until the pulse of every node whose ranks
    still run, but ``skip``'s, has heard the mark.  For the process whose
    end ends the job's store.  False if some had not at the end.  ``lost``:
    the ranks the loss names (their nodes' pulses will never hear it)."""
    deadline = time.monotonic() + seconds
    nodes = [n for n in _listed(store) if n not in skip]
    if not nodes:
        return True
    values = [bytes(v) for v in store.multi_get([lease_key(n) for n in nodes])]
    readings = {n: lease.read(v) for n, v in zip(nodes, values, strict=True)}
    keys = [heard_key(n) for n in awaited(readings, lost)]
    while keys and not store.check(keys):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_LINGER_LOOK)
    return True


def awaited(readings: Mapping[str, lease.Reading], lost: Collection[int]) -> list[str]:
    """Of the nodes whose leases read ``readings``, those whose pulse can
    still hear the mark: not those whose ranks have all ended, nor those of
    the ranks ``lost`` (the node that was lost, gone with its pulse)."""
    gone = set(lost)
    return [n for n, r in readings.items() if not r.ended and not gone.intersection(r.ranks)]


def _listed(store: Any) -> list[str]:
    """The nodes that have a pulse (and so a lease), one request that never waits."""
    listing = bytes(store.compare_set(LIST, "", "")).decode()
    return list(dict.fromkeys(entry.rsplit(" ", 1)[0] for entry in listing.split("\n") if entry))


def _only(*keep: int) -> None:
    """Close every descriptor but ``keep``'s; standard output and error go
    to /dev/null (torch's client logs there; the pulse has nothing to say)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- in the pulse's own process ------------------------------------------------------


def _serve(argv: Sequence[str], stdin: IO[bytes], tell: int) -> int:
    import select
    import socket

    import torch.distributed as dist

    from . import keepalive
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
    waiting = tcp.clone()  # type: ignore[attr-defined]  # the wait for the mark: its own
    keepalive.keep_alive(host, store_port)
    store: Any = dist.PrefixStore(namespace, tcp)  # type: ignore[attr-defined]

    def told(loss: bytes) -> None:
        with contextlib.suppress(OSError):  # the main has ended: its ranks' watch tells
            os.write(tell, loss + b"\n")

    marks = dist.PrefixStore(namespace, waiting)  # type: ignore[attr-defined]
    threading.Thread(
        target=listen, args=(marks, node, told), name="syncdeco-pulse-listen", daemon=True
    ).start()
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
        changed.set()  # renew now: the lease names every rank it serves

    def read_stdin() -> None:
        for line in stdin:  # "rank pid" lines
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
