"""``python -m syncdeco where``: where every rank of a running job is now.

Every rank runs a stack responder (``_plane/stacks.py``) from its first
sync point on, over the job's store.  This tool is no rank: it connects to
the store as one more client, finds the job's responders there, asks each
for its main thread's stack (the same request a timed-out sync point makes,
so a rank that answers does nothing else: its sync points and the
responders' own protocol with the store's host go on as before) and waits
2 s at most, in all, for the answers.

The store is found from this machine's ranks (``_jobs``: their
``MASTER_ADDR:MASTER_PORT``) or named with ``--store``.  syncdeco's keys
live under prefixes the tool does not know (the job's run, and whatever
prefix torch's own store adds: ``default_pg/0`` under
torchrun for a group the program made): so it lists the store's keys once
(``list_keys``, one request) and takes every prefix under which
responders said who they are (``PREFIX/RANK/who``) as a job; responders
that have stopped (``PREFIX/RANK/off``) belong to ranks that have exited.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, final

import torch.distributed as dist

from . import _proc
from ._jobs import LocalJob, local_jobs
from ._plane.stacks import StackReport, fetch_stacks, last_answer, who
from ._where_text import as_data, format_where, heading

__all__ = [
    "ANSWER_WAIT",
    "Snapshot",
    "StoreJob",
    "WhereError",
    "ask",
    "choose",
    "connect",
    "jobs_in",
    "where",
]

ANSWER_WAIT: Final = 2.0  # seconds, in all, for the ranks' answers
CONNECT_WAIT: Final = 2.0  # seconds to reach the store
_STORE_TIMEOUT: Final = 5.0  # the connection's own timeout (a key read that waits)
_KEY: Final = re.compile(r"^(?P<prefix>.+)/(?P<rank>\d+)/(?P<what>who|off)$")


@final
class WhereError(Exception):
    """What ``where`` cannot show, said for the user (exit status 1)."""


@final
@dataclass(frozen=True, slots=True)
class StoreJob:
    """A job's responders, as found in a store: ``prefix``, the keys' prefix
    there; ``who``: what each rank's responder said as it started (host,
    pid, pid namespace, world size, start time); ``ended``: the ranks whose
    responder has stopped."""

    store: str
    prefix: str
    who: Mapping[int, tuple[Any, ...]]
    ended: frozenset[int]

    @property
    def name(self) -> str:
        """The job's prefix without syncdeco's own part, for people."""
        name = self.prefix.removesuffix("/stack").removesuffix("syncdeco").strip("/")
        name = name.replace("//", "/").removeprefix("syncdeco-job/")
        return name or "(no prefix)"

    @property
    def world_size(self) -> int:
        sizes = [int(w[3]) for w in self.who.values() if len(w) > 3 and w[3]]
        return max([*sizes, max(self.who, default=-1) + 1])

    @property
    def running(self) -> list[int]:
        return sorted(set(self.who) - self.ended)


@final
@dataclass(frozen=True, slots=True)
class Snapshot:
    """One look at a job: each rank's report, silent ranks' last answers
    still kept, when it was asked (wall clock) and how long it took."""

    job: StoreJob
    reports: Mapping[int, StackReport]
    last: Mapping[int, StackReport] = field(default_factory=dict)
    asked_at: float = 0.0
    took: float = 0.0


def connect(addr: str, port: int, *, wait: float = CONNECT_WAIT) -> Any:
    """A client connection to the store at ``addr:port``: raises
    :class:`WhereError` if nothing accepts one within ``wait`` seconds.  A
    plain socket looks first, so that a store that is gone makes torch's
    client log nothing."""
    where = f"{addr}:{port}"
    try:
        with socket.create_connection((addr, port), timeout=wait):
            pass
    except OSError as exc:
        raise WhereError(
            f"nothing answers at {where} ({exc.strerror or exc}): the job has ended "
            f"(its store ended with it: torchrun's agent, or rank 0), or its store is "
            f"not there. Name the store with --store HOST:PORT (torchrun's "
            f"--rdzv-endpoint, or MASTER_ADDR:MASTER_PORT)."
        ) from None
    try:
        return dist.TCPStore(  # type: ignore[attr-defined]
            addr,
            port,
            None,
            False,
            timeout=timedelta(seconds=max(wait, 1.0)),
            wait_for_workers=False,
        )
    except (dist.DistError, RuntimeError) as exc:
        raise WhereError(f"could not connect to the store at {where}: {exc}") from None


def jobs_in(store: Any, where: str) -> list[StoreJob]:
    """The jobs whose responders said who they are in ``store`` (one
    ``list_keys``, then one ``multi_get`` per job)."""
    try:
        keys = store.list_keys()
    except (AttributeError, RuntimeError) as exc:
        raise WhereError(
            f"the store at {where} cannot list its keys ({exc}): this needs torch's "
            f"TCPStore as torch 2.7 and later serve it."
        ) from None
    found: dict[str, tuple[set[int], set[int]]] = {}
    listed = set(keys)
    for key in keys:
        m = _KEY.match(key)
        if m is None or f"{m['prefix']}/started" not in listed:
            continue
        said, ended = found.setdefault(m["prefix"], (set(), set()))
        (said if m["what"] == "who" else ended).add(int(m["rank"]))
    store.set_timeout(timedelta(seconds=_STORE_TIMEOUT))
    jobs = []
    for prefix, (said, ended) in sorted(found.items()):
        jobs.append(StoreJob(where, prefix, who(store, prefix, sorted(said)), frozenset(ended)))
    return jobs


def choose(
    jobs: Sequence[StoreJob], where: str, *, local: LocalJob | None = None, job: str | None = None
) -> StoreJob:
    """The job to show among those in one store: the one whose responders
    run in ``local``'s processes, or whose name contains ``job``, or the
    only one that still runs."""
    if not jobs:
        raise WhereError(
            f"no syncdeco rank has said where it is in the store at {where}: a rank "
            f"starts answering at its first syncdeco sync point (a barrier, a "
            f"decorated function), so the job's ranks have not reached one yet, or "
            f"they do not use syncdeco."
        )
    picked = list(jobs)
    if local is not None:
        pids = {(socket.gethostname(), p) for r in local.ranks for p in r.pids}
        picked = [j for j in jobs if any((w[0], w[1]) in pids for w in j.who.values())]
        if not picked:
            ranks = ", ".join(f"{r.rank} (pid {r.pid})" for r in local.ranks)
            raise WhereError(
                f"the ranks of job {local.id} on this machine, rank {ranks}, have not "
                f"said where they are in its store at {where}: a rank starts answering "
                f"at its first syncdeco sync point (a barrier, a decorated function), "
                f"so they have not reached one yet, or they do not use syncdeco."
            )
    elif job is not None:
        picked = [j for j in jobs if job in j.prefix]
        if not picked:
            raise WhereError(
                f"no job in the store at {where} matches --job {job!r}; its jobs:\n"
                + _listing(jobs)
            )
    running = [j for j in picked if j.running]
    if len(picked) > 1 and len(running) == 1:
        picked = running
    if len(picked) > 1:
        raise WhereError(
            f"the store at {where} holds several jobs (a torchrun job's restarts, "
            f"or jobs that share a store); pick one with --job TEXT (part of its "
            f"name):\n" + _listing(picked)
        )
    return picked[0]


def _listing(jobs: Sequence[StoreJob]) -> str:
    return "\n".join(f"  {j.name}: {j.world_size} ranks, {len(j.running)} running" for j in jobs)


def ask(store: Any, job: StoreJob, *, timeout: float = ANSWER_WAIT) -> Snapshot:
    """Ask every running rank of ``job`` where it is, and wait ``timeout``
    seconds at most for the answers.  Raises :class:`WhereError` if the job
    has ended (every rank's responder has stopped)."""
    if not job.running:
        raise WhereError(
            f"job {job.name} at {job.store} has ended: the stack responders of all "
            f"its {len(job.who)} ranks have stopped (their processes exited)."
        )
    asked_at = time.time()
    began = time.monotonic()
    reports = dict(fetch_stacks(store, job.prefix, job.running, timeout=timeout))
    took = time.monotonic() - began
    for rank in range(job.world_size):
        if rank in reports:
            continue
        host, pid = _who(job, rank)
        if rank in job.ended:
            reports[rank] = StackReport(rank, host=host, pid=pid, reason="has exited", ended=True)
        else:
            reports[rank] = StackReport(
                rank,
                reason="has no stack responder: it has not reached its first syncdeco "
                "sync point yet",
            )
    last = {}
    for rank, report in reports.items():
        if not report.answered and not report.ended:
            seen = last_answer(store, job.prefix, rank)
            said = job.who.get(rank, ())
            if seen is not None:
                last[rank] = seen
            elif len(said) > 4 and said[4]:  # when its responder started
                age = max(0.0, asked_at - float(said[4]))
                last[rank] = StackReport(rank, reason="started answering", age=age)
    if all(r.ended for r in reports.values()):
        raise WhereError(
            f"job {job.name} at {job.store} has ended: none of its {job.world_size} "
            f"ranks answered, and every one's stack responder has stopped."
        )
    return Snapshot(job, dict(sorted(reports.items())), last, asked_at, took)


def _who(job: StoreJob, rank: int) -> tuple[str | None, int | None]:
    said = job.who.get(rank)
    return (None, None) if said is None else (str(said[0]), int(said[1]))


# -- the command ---------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise WhereError(f"--store {text!r} is not HOST:PORT (e.g. node0:29500)")
    return host.strip("[]"), int(port)


def _local(job: str | None, pid: int | None) -> LocalJob:
    """The job on this machine to show."""
    jobs = local_jobs()
    if pid is not None:
        jobs = [j for j in jobs if any(pid in r.pids for r in j.ranks)]
        if not jobs:
            if _proc.ended(pid):
                raise WhereError(f"process {pid} has ended (no such process on this machine)")
            raise WhereError(
                f"process {pid} is no rank of a job: its environment has no launcher's "
                f"variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or this user "
                f"may not read it."
            )
    if job is not None:
        jobs = [j for j in jobs if job in j.id]
    if not jobs:
        raise WhereError(
            "no rank of a running job was found on this machine (no process of this "
            "user with a launcher's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            + (f" in job {job!r}" if job is not None else "")
            + "): the job has ended, or runs elsewhere. On one of its nodes run this "
            "again, or name its store with --store HOST:PORT."
        )
    if len(jobs) > 1:
        raise WhereError(
            "ranks of several jobs run on this machine; pick one with --job ID or "
            "--pid PID:\n" + "\n".join("  " + j.describe() for j in jobs)
        )
    return jobs[0]


def where(
    *, store: str | None = None, job: str | None = None, pid: int | None = None, data: bool = False
) -> str:
    """What ``python -m syncdeco where`` prints (``data``: as JSON).
    Raises :class:`WhereError` when there is no job to show."""
    local = None
    if store is not None:
        addr, port = _address(store)
    else:
        local = _local(job, pid)
        addr, port = local.addr, local.port
    at = f"{addr}:{port}"
    tcp = connect(addr, port)
    try:
        picked = choose(jobs_in(tcp, at), at, local=local, job=None if local else job)
        seen = ask(tcp, picked)
    except (dist.DistError, RuntimeError) as exc:
        raise WhereError(
            f"the store at {at} stopped answering while asked ({exc}): the job has "
            f"ended, or its store's host is lost."
        ) from None
    if local is not None:
        name = f"{local.launcher} job" + ("" if local.id == at else f" {local.id}")
    else:
        name = f"job {picked.name}"
    if data:
        found = as_data(
            seen.reports,
            job=name,
            store=at,
            took=seen.took,
            asked_at=seen.asked_at,
            last=seen.last,
        )
        return json.dumps(found, indent=2) + "\n"
    return format_where(
        seen.reports, heading=heading(name, at, seen.reports, seen.took), last=seen.last
    )
