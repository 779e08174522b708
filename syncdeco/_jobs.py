"""The jobs whose ranks run on this machine, read from ``/proc``.

``python -m syncdeco where`` run with no argument looks here for the job to
show: every process whose environment a launcher set (torchrun, SLURM, Open
MPI, or RANK and WORLD_SIZE by hand; see ``_env``) is a rank, and ranks
with the same store (``MASTER_ADDR:MASTER_PORT``) and the same run of the
job (``_startup.namespace``) are one job.  A rank is the outermost process
with its variables, together with the processes under it that carry the
same rank (a DataLoader worker; the rank itself, where the outermost is a
wrapper such as ``timeout`` or a shell).  This process and its ancestors
(a shell inside a job step) are left out.

Only processes whose ``/proc/PID/environ`` this user may read are seen:
the user's own (or all, as root).  Nothing here touches a store.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, final

from . import _proc
from ._env import LaunchEnvError, detect_launch
from ._startup import namespace

__all__ = ["LocalJob", "LocalRank", "children", "job_of", "local_jobs", "read_environ"]

# The variables that name a run of a job, most telling first (see job_id).
_ID_VARIABLES: Final = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid")


@final
@dataclass(frozen=True, slots=True)
class LocalRank:
    """One rank's process on this machine: the outermost that carries its
    variables; ``family`` also holds the processes under it that carry
    them (the rank itself where ``pid`` is a wrapper, ``timeout`` or a
    shell; its DataLoader workers)."""

    pid: int
    rank: int
    parent: int
    family: frozenset[int] = frozenset()

    @property
    def pids(self) -> frozenset[int]:
        return self.family | {self.pid}


@final
@dataclass(frozen=True, slots=True)
class LocalJob:
    """A job with ranks on this machine: its id (:func:`job_id`), launcher,
    store, size and run (``_startup.namespace``), and the ranks seen here."""

    id: str
    launcher: str
    addr: str
    port: int
    world_size: int
    run: str
    ranks: tuple[LocalRank, ...]

    def describe(self) -> str:
        """One line for a list of jobs to choose from."""
        ranks = ", ".join(f"{r.rank} (pid {r.pid})" for r in self.ranks)
        return (
            f"{self.launcher} job {self.id}: store {self.addr}:{self.port}, "
            f"{self.world_size} ranks; here: rank {ranks}"
        )


def job_id(env: Mapping[str, str]) -> str:
    """A short name for a job, for ``--job``: its launcher's run id
    (torchrun's ``--rdzv-id``, SLURM's job and step), else its store's
    address."""
    if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and "RANK" not in env:
        return f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    for var in _ID_VARIABLES:
        value = env.get(var)
        if value and value != "none":
            return value
    return f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"


def read_environ(pid: int, proc: Path = Path("/proc")) -> dict[str, str] | None:
    """``pid``'s environment as it started, or None where it cannot be read
    (another user's process, or one that has ended)."""
    try:
        raw = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            env[name.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _parent(pid: int, proc: Path) -> int:
    try:
        fields = _proc.stat(pid, proc)
    except OSError:
        return 0
    return int(fields[1]) if fields and len(fields) > 1 else 0


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The processes whose parent is ``pid`` (a launcher's agent: its ranks)."""
    return [child for child in _pids(proc) if _parent(child, proc) == pid]


def _ancestors(pid: int, proc: Path) -> set[int]:
    seen: set[int] = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        pid = _parent(pid, proc)
    return seen


def _pids(proc: Path) -> Iterable[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def job_of(env: Mapping[str, str]) -> tuple[str, str, str, int, int, str] | None:
    """(id, launcher, store address, port, world size, run) of the job
    ``env`` describes, or None: no launcher, one rank, or no store named."""
    try:
        launch = detect_launch(env)
    except LaunchEnvError:
        return None
    if launch is None or launch.world_size < 2:
        return None
    if launch.master_addr is None or launch.master_port is None:
        return None
    return (
        job_id(env),
        launch.launcher,
        launch.master_addr,
        launch.master_port,
        launch.world_size,
        namespace(env),
    )


def _family(rank: LocalRank, under: Mapping[int, Sequence[LocalRank]]) -> frozenset[int]:
    """The processes under ``rank``'s that carry the same rank."""
    found: set[int] = set()
    todo = [rank.pid]
    while todo:
        for child in under.get(todo.pop(), ()):
            if child.rank == rank.rank and child.pid not in found:
                found.add(child.pid)
                todo.append(child.pid)
    return frozenset(found)


def local_jobs(proc: Path = Path("/proc")) -> list[LocalJob]:
    """The jobs with ranks on this machine, in order of their ids."""
    skip = _ancestors(os.getpid(), proc)
    found: dict[tuple[str, str, str, int, int, str], list[LocalRank]] = {}
    for pid in _pids(proc):
        if pid in skip:
            continue
        env = read_environ(pid, proc)
        if env is None:
            continue
        job = job_of(env)
        if job is None:
            continue
        try:
            rank = detect_launch(env)
        except LaunchEnvError:
            continue
        assert rank is not None
        found.setdefault(job, []).append(LocalRank(pid, rank.rank, _parent(pid, proc)))
    jobs = []
    for (ident, launcher, addr, port, size, run), ranks in found.items():
        pids = {r.pid for r in ranks}
        # A rank's child (a DataLoader worker) has its variables, not its
        # place; nor has a wrapper's (timeout, a shell) child its own, though
        # it is the rank: each rank is its outermost process, with the
        # processes under it that carry the same rank.
        under: dict[int, list[LocalRank]] = {}
        for r in ranks:
            under.setdefault(r.parent, []).append(r)
        own = [replace(r, family=_family(r, under)) for r in ranks if r.parent not in pids]
        own.sort(key=lambda r: (r.rank, r.pid))
        jobs.append(LocalJob(ident, launcher, addr, port, size, run, tuple(own)))
    jobs.sort(key=lambda j: (j.id, j.addr, j.port, j.run))
    return jobs
