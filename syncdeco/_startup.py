"""syncdeco's own connection to a launcher's store, before any process group.

Sync traffic needs only a c10d store; the process group is needed for tensor
results alone.  So when a launcher started this process and no group exists
yet, the first sync point runs over a store connection opened here, from the
launcher's variables, as torch's ``env://`` and ``tcp://`` rendezvous open
theirs (``torch.distributed.rendezvous._create_c10d_store``):

* under torchrun with ``TORCHELASTIC_USE_AGENT_STORE=True`` its agent hosts
  the store at MASTER_ADDR:MASTER_PORT and every rank is a client;
* otherwise (SLURM, Open MPI, RANK and WORLD_SIZE set by hand) rank 0 hosts
  it there, without waiting for the others in the constructor, and shares
  it with a later ``init_process_group`` of the same process
  (``multi_tenant``).

A client waits for the store only as long as the sync point that needs it
may wait; :class:`StoreUnreachable` says where it looked.  syncdeco's keys
live under a prefix per job, step and restart (:func:`namespace`), so a
restarted torchrun job, whose agent keeps its store, never reads the keys of
the attempt before.  The process group is made later, once every rank has
met, over :meth:`JobStore.group_store`.

Nothing here knows the sync protocol: the caller writes its own keys.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, final

import torch.distributed as dist

from ._env import Launch, open_mpi_ranks
from ._errors import SyncError
from ._excepthook import install as prefix_tracebacks
from ._loopback import LOOPBACK, host_on_loopback

__all__ = [
    "EXIT_NOTICE_CONNECT",
    "EXIT_NOTICE_WAIT",
    "JobStore",
    "StoreUnreachable",
    "agent_hosts",
    "namespace",
    "open_store",
    "store_for_exit_notice",
]

EXIT_NOTICE_WAIT: Final = 2.0  # seconds an exiting rank looks for a store that accepts
# Seconds it may then take to connect: the store is up, but a loaded host
# can take seconds to answer a new client's handshake (2 s fell short in 1
# run of about 10 with 3 jobs at once on 2 busy cores).  The price: a store
# that accepted the look and then went away (a launcher tearing the job
# down) holds the exit up to this long while torch's client retries.
EXIT_NOTICE_CONNECT: Final = 10.0
_FOREVER_CHUNK: Final = 3600.0  # one connection attempt, when a sync point waits forever
_PROBE_PAUSE: Final = 0.05  # seconds between attempts to reach a store that is not up

# The variables that tell one run of a job from another: torchrun's run and
# restart (its agent keeps its store across restarts), SLURM's job, step and
# requeue count.
_RUN_VARIABLES: Final = (
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_RESTART_COUNT",
)


def namespace(env: Mapping[str, str]) -> str:
    """The prefix of syncdeco's keys for this run of the job: equal on its
    ranks, different for another run or restart that shares the store.
    (Not SLURM's step under Open MPI: within an allocation its ranks do
    not share one, see ``_env.node_key``; its rank 0 hosts the store, which
    no other run shares.)"""
    skip = ("SLURM_STEP_ID",) if open_mpi_ranks(env) else ()
    run = ",".join(f"{var}={env[var]}" for var in _RUN_VARIABLES if var in env and var not in skip)
    return f"syncdeco-job/{run or 'run'}/"


def agent_hosts(launch: Launch, env: Mapping[str, str]) -> bool:
    """Whether a launcher's agent hosts the store (torchrun's agent store),
    rather than rank 0.  Read as torch reads it."""
    return launch.launcher == "torchrun" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


@final
class StoreUnreachable(Exception):
    """This rank could not reach the job's store within ``waited`` seconds."""

    def __init__(self, store: str, waited: float, cause: BaseException) -> None:
        super().__init__(f"{store}: not reached within {waited:g}s ({cause})")
        self.store = store
        self.waited = waited
        self.cause = cause


@final
@dataclass(frozen=True, slots=True)
class JobStore:
    """This process's connection to its job's store, with syncdeco's prefix.

    ``store`` is where syncdeco's keys go; ``tcp`` the connection itself
    (the server too, on the rank that hosts it: it must live as long as the
    process may sync)."""

    store: Any  # a c10d PrefixStore over tcp
    tcp: Any  # a c10d TCPStore
    addr: str
    port: int
    host: str  # who hosts it, for messages: "rank 0" or "torchrun's agent"
    hosted_here: bool

    def describe(self) -> str:
        """Who hosts the store, and where ("rank 0 hosts the store at h:p")."""
        return _describe(self.host, self.addr, self.port)

    def group_store(self) -> Any:
        """The store for ``init_process_group(store=...)``: under syncdeco's
        prefix, so the group's keys never meet syncdeco's own."""
        return dist.PrefixStore(  # type: ignore[attr-defined]
            "group/", self.store
        )


def _describe(host: str, addr: str, port: int) -> str:
    return f"{host} hosts the store at {addr}:{port}"


_lock = threading.Lock()
_opened: JobStore | None = None


def open_store(launch: Launch, env: Mapping[str, str], timeout: float | None) -> JobStore:
    """This process's connection to its job's store, opened on first call.

    A client waits up to ``timeout`` seconds (None: forever) for the store to
    accept it, then raises :class:`StoreUnreachable`; rank 0, where it hosts
    the store, never waits.  Raises ``SyncError`` when rank 0 cannot host it
    (the port is taken)."""
    global _opened
    with _lock:
        if _opened is not None:
            return _opened
        # This process is a rank of a job from now on: its uncaught exception
        # is written prefixed with its rank, in one piece, as torch's process
        # group would have it written (it has none yet).
        prefix_tracebacks(launch.rank)
        if launch.world_size == 1:
            # Alone: a store of its own, nobody to find (the launcher's
            # variables name no store for a job of one rank).
            # On loopback: nothing else is meant to connect (see _loopback).
            tcp = host_on_loopback(world_size=1, seconds=_FOREVER_CHUNK)
            store = dist.PrefixStore(  # type: ignore[attr-defined]
                namespace(env), tcp
            )
            _opened = JobStore(store, tcp, LOOPBACK, tcp.port, "rank 0", hosted_here=True)
            return _opened
        if launch.master_addr is None or launch.master_port is None:
            raise SyncError(
                f"rank {launch.rank} of {launch.world_size} ({launch.launcher}) has no "
                f"MASTER_ADDR/MASTER_PORT, so it cannot find the other ranks."
            )
        addr, port = launch.master_addr, launch.master_port
        by_agent = agent_hosts(launch, env)
        host = "torchrun's agent" if by_agent else "rank 0"
        if not by_agent and launch.rank == 0:
            try:
                tcp = _tcp(addr, port, launch.world_size, master=True, seconds=_FOREVER_CHUNK)
            except (dist.DistError, RuntimeError) as exc:
                raise SyncError(
                    f"rank 0 could not host the job's store at {addr}:{port} "
                    f"(MASTER_ADDR:MASTER_PORT, {launch.launcher}): {exc}. Another "
                    f"process may be using that port: pick a free MASTER_PORT."
                ) from exc
        else:
            tcp = _connect(addr, port, timeout, _describe(host, addr, port))
        store = dist.PrefixStore(  # type: ignore[attr-defined]
            namespace(env), tcp
        )
        _opened = JobStore(store, tcp, addr, port, host, hosted_here=tcp_is_server(launch, env))
        return _opened


def tcp_is_server(launch: Launch, env: Mapping[str, str]) -> bool:
    """Whether this rank hosts the job's store."""
    return launch.rank == 0 and not agent_hosts(launch, env)


def _tcp(addr: str, port: int, world_size: int, *, master: bool, seconds: float) -> Any:
    # torch re-exports TCPStore without declaring it
    return dist.TCPStore(  # type: ignore[attr-defined]
        addr,
        port,
        world_size if master else None,
        is_master=master,
        timeout=timedelta(seconds=seconds),
        wait_for_workers=False,
        multi_tenant=master,
    )


def _connect(addr: str, port: int, timeout: float | None, where: str) -> Any:
    """A client connection, tried until ``timeout`` seconds have passed
    (None: forever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        problem = _reachable(addr, port, deadline)
        if problem is None:
            left = _FOREVER_CHUNK if deadline is None else deadline - time.monotonic()
            try:
                tcp = _tcp(addr, port, 0, master=False, seconds=max(left, 1.0))
            except (dist.DistError, RuntimeError) as exc:
                problem = exc  # it went away between the probe and the connection
            else:
                tcp.set_timeout(timedelta(seconds=_FOREVER_CHUNK))
                return tcp
        if deadline is not None and time.monotonic() >= deadline:
            raise StoreUnreachable(where, timeout or 0.0, problem)
        time.sleep(_PROBE_PAUSE)


class _NoAnswer(ConnectionError):
    def __str__(self) -> str:
        return "nothing accepted a connection there"


def _reachable(addr: str, port: int, deadline: float | None) -> BaseException | None:
    """Wait until something accepts a TCP connection at addr:port, or until
    ``deadline``; returns None then, else the error.  A plain socket, so a
    store that is not up yet makes no noise (torch's client logs each failed
    attempt with a C++ stack)."""
    while True:
        left = _FOREVER_CHUNK if deadline is None else deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(min(left, 1.0), 0.001)):
                return None
        except OSError as exc:
            if left <= _PROBE_PAUSE:
                return exc
        time.sleep(_PROBE_PAUSE)


def store_for_exit_notice(
    launch: Launch | None, env: Mapping[str, str], *, child: bool = False
) -> Any | None:
    """Where an exiting rank that has no process group writes its exit
    notice: the job store it has open, or a connection made now to a store
    found accepting within EXIT_NOTICE_WAIT seconds (the connection itself
    may take up to EXIT_NOTICE_CONNECT).  None where no notice can or should be
    written: no multi-rank launch; this rank hosts the store and never
    opened it (nobody can have reached it); this process is a
    multiprocessing child (a DataLoader worker inherits its rank's
    variables, but is not that rank), unless ``child`` says it is the rank
    (syncdeco.testing's ranks are); or the store cannot be reached."""
    if _opened is not None:
        return _opened.store
    if launch is None or launch.world_size < 2:
        return None
    if not child and multiprocessing.parent_process() is not None:
        return None
    if tcp_is_server(launch, env) or launch.master_addr is None or launch.master_port is None:
        return None
    addr, port = launch.master_addr, launch.master_port
    if _reachable(addr, port, time.monotonic() + EXIT_NOTICE_WAIT) is not None:
        return None
    try:
        tcp = _tcp(addr, port, 0, master=False, seconds=EXIT_NOTICE_CONNECT)
    except (dist.DistError, RuntimeError):
        return None
    return dist.PrefixStore(  # type: ignore[attr-defined]
        namespace(env), tcp
    )


def _forget_in_child() -> None:
    # A forked child is no rank of its parent's job: it has no store of its
    # own (and must not stop its parent's server when collected).
    global _opened, _lock
    _lock = threading.Lock()
    if _opened is not None:
        _leaked.append(_opened)
    _opened = None


_leaked: list[JobStore] = []  # a forked child's copy of its parent's store, kept alive
os.register_at_fork(after_in_child=_forget_in_child)
