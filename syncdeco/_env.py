"""Reading a launcher's environment: torchrun, SLURM and Open MPI.

Nothing here touches torch.distributed; it only turns environment variables
into a :class:`Launch` or raises a :class:`LaunchEnvError` naming the variable
that is wrong.
"""

from __future__ import annotations

import itertools
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, final

from ._errors import SyncError

__all__ = [
    "Launch",
    "LaunchEnvError",
    "detect_launch",
    "format_tasks_per_node",
    "local_rank_from_env",
    "local_world_size_from_env",
    "node_key",
    "node_ranks_from_env",
    "open_mpi_ranks",
    "parse_tasks_per_node",
]


@final
class LaunchEnvError(SyncError, ValueError):
    """The launcher's environment variables are missing or malformed."""

    __module__ = "syncdeco"


@final
@dataclass(frozen=True, slots=True)
class Launch:
    """Where this process sits in a job, as its launcher described it."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


# (launcher, rank variable, world size variable, local rank variable)
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)

# local rank variable -> (launcher, its node's size variable or None, the job's size variable)
_LOCAL: dict[str, tuple[str, str | None, str]] = {
    "LOCAL_RANK": ("torchrun", "LOCAL_WORLD_SIZE", "WORLD_SIZE"),
    "OMPI_COMM_WORLD_LOCAL_RANK": (
        "Open MPI",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "OMPI_COMM_WORLD_SIZE",
    ),
    "SLURM_LOCALID": ("SLURM", None, "SLURM_NTASKS"),
}
_LOCAL_RANK_VARS = tuple(_LOCAL)

# The command that starts each launcher's ranks.
_COMMAND = {"torchrun": "torchrun", "Open MPI": "mpirun", "SLURM": "srun"}

# How each launcher counts a job's ranks, for a world size below 1.
_COUNTS = {
    "torchrun": "torchrun sets it to the number of processes in the job "
    "(--nnodes times --nproc-per-node)",
    "Open MPI": "mpirun sets it to the number of processes it starts (-n N)",
    "SLURM": "srun sets it to the number of tasks in the job step (--ntasks N)",
}


def _int(env: Mapping[str, str], var: str, launcher: str, *, minimum: int | None = None) -> int:
    raw = env[var]
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchEnvError(
            f"{var}={raw!r} is not an integer; {launcher} sets it to a whole number. "
            f"Unset it, or launch through {launcher}."
        ) from None
    if minimum is not None and value < minimum:
        raise LaunchEnvError(
            f"{var}={raw!r} must be at least {minimum} ({launcher} sets it). Launch "
            f"through {launcher}, or fix the value where it is exported."
        )
    return value


def _size(env: Mapping[str, str], var: str, launcher: str, rank_var: str) -> int:
    """A job's number of ranks: at least one."""
    value = _int(env, var, launcher)
    if value < 1:
        raise LaunchEnvError(
            f"{var}={env[var]!r}, but a job has at least one rank: {_COUNTS[launcher]}. "
            f"Where you set it by hand, set it to the number of ranks (1 for a single "
            f"process), or unset {rank_var} and {var} to run as one process."
        )
    return value


def _local_size(env: Mapping[str, str], var: str, launcher: str) -> int:
    """A node's number of ranks: at least one, this process."""
    value = _int(env, var, launcher)
    if value < 1:
        raise LaunchEnvError(
            f"{var}={env[var]!r}, but this process's node runs at least one rank: "
            f"{launcher} sets it to the number of ranks on the node. Launch through "
            f"{_COMMAND[launcher]}, or, where you set it by hand, set it to that number "
            f"or unset it."
        )
    return value


def _local_rank(env: Mapping[str, str], var: str, *, world_size: int | None = None) -> int:
    """``var``, this process's rank on its node, checked against the same
    launcher's count of ranks on the node, or else ``world_size`` if given."""
    launcher, local_size_var, size_var = _LOCAL[var]
    value = _int(env, var, launcher, minimum=0)
    if local_size_var is not None and local_size_var in env:
        bound_var, bound = local_size_var, _local_size(env, local_size_var, launcher)
    elif var == "SLURM_LOCALID" and (slurm := _slurm_node_size(env)) is not None:
        bound_var, bound = slurm
    elif world_size is not None:
        bound_var, bound = size_var, world_size
    else:
        return value
    if value >= bound:
        raise LaunchEnvError(
            f"{var}={value} is not below {bound_var}={bound}: {launcher} numbers the "
            f"ranks on a node from 0 to {bound - 1}. Launch through {_COMMAND[launcher]}, or, "
            f"where you set them by hand, give each process on a node its own {var} "
            f"below {bound_var}."
        )
    return value


def detect_launch(env: Mapping[str, str]) -> Launch | None:
    """Return the job described by ``env``, or None when no launcher is found.

    Raises :class:`LaunchEnvError` naming the variable when a launcher's
    variables are present but unusable.
    """
    for launcher, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var not in env and size_var not in env:
            continue
        if launcher == "SLURM" and not _in_srun_step(env):
            # An salloc shell or an sbatch script has SLURM variables too, but
            # it is one process, not a rank of a job step.
            continue
        for var in (rank_var, size_var):
            if var not in env:
                other = size_var if var == rank_var else rank_var
                if var == "RANK" and "NODE_RANK" in env and "LOCAL_RANK" in env:
                    raise LaunchEnvError(
                        "WORLD_SIZE, NODE_RANK and LOCAL_RANK are set but RANK is not: "
                        "Lightning's launcher (Fabric or Trainer) starts processes like "
                        "this and sets up the process group later. Use syncdeco after "
                        "fabric.launch() (or, under a Trainer, after setup), when the "
                        "group exists."
                    )
                raise LaunchEnvError(
                    f"{other} is set but {var} is not; {launcher} sets both. "
                    f"Set {var} or unset {other}."
                )
        world_size = _size(env, size_var, launcher, rank_var)
        rank = _int(env, rank_var, launcher)
        if not 0 <= rank < world_size:
            raise LaunchEnvError(
                f"{rank_var}={rank} is not a rank of a job of {size_var}={world_size}: "
                f"ranks run from 0 to {world_size - 1}. Launch through {_COMMAND[launcher]}, or, "
                f"where you set them by hand, give each process its own {rank_var} "
                f"in that range."
            )
        local_rank = (
            _local_rank(env, local_var, world_size=world_size) if local_var in env else rank
        )
        addr = env.get("MASTER_ADDR")
        port: int | None = None
        if world_size > 1:
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if not env.get(var):
                    fix = (
                        "torchrun sets it: start the ranks with torchrun, or export it "
                        "where RANK and WORLD_SIZE are set by hand"
                        if launcher == "torchrun"
                        else f"{launcher} does not set it: export it in the job script "
                        f"before starting the ranks (e.g. rank 0's host name and a free port)"
                    )
                    raise LaunchEnvError(
                        f"{var} is not set, but {size_var}={world_size} needs it to "
                        f"find rank 0 ({launcher} job); {fix}."
                    )
            port = _int(env, "MASTER_PORT", launcher, minimum=1)
            if port > 65535:
                raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port (1-65535).")
        return Launch(launcher, rank, world_size, local_rank, addr, port)
    return None


# Slurm numbers the steps srun starts from 0, below SLURM_MAX_NORMAL_STEP_ID;
# its own steps have ids above it (the batch script's, the extern one, and
# salloc's shell with LaunchParameters=use_interactive_step, whose
# SLURM_STEP_ID is 4294967290), which moved between releases.
_SPECIAL_STEPS: Final = 0xFFFFFFF0


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of a step srun started: not an
    sbatch script, nor salloc's shell (SLURM variables there describe the
    allocation, and the process is one, not rank 0 of them)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    return step is not None and step.isascii() and step.isdecimal() and int(step) < _SPECIAL_STEPS


def local_world_size_from_env(env: Mapping[str, str]) -> int | None:
    """How many ranks run on this node, as the launcher said, or None.

    Under SLURM (its variables alone describe the ranks, in an srun step):
    the count that ``SLURM_STEP_TASKS_PER_NODE`` (or ``SLURM_TASKS_PER_NODE``)
    gives node ``SLURM_NODEID``.  Raises :class:`LaunchEnvError` naming the
    variable when one is malformed."""
    for var, launcher in (
        ("LOCAL_WORLD_SIZE", "torchrun"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "Open MPI"),
    ):
        if var in env:
            return _local_size(env, var, launcher)
    slurm = _slurm_node_size(env)
    return None if slurm is None else slurm[1]


# -- SLURM's tasks per node ----------------------------------------------------------

_TASKS_PER_NODE_VARS: Final = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
_MOST_NODES: Final = 1 << 20  # a bound on what a value may expand to
_RUN: Final = re.compile(r"([1-9][0-9]*)(?:\(x([1-9][0-9]*)\))?")


def parse_tasks_per_node(value: str, *, var: str = "SLURM_TASKS_PER_NODE") -> tuple[int, ...]:
    """SLURM's tasks per node, one count per node in node order:
    ``"4(x2),3"`` is ``(4, 4, 3)``.  Counts are separated by commas, and a run
    of ``M`` nodes of ``N`` tasks is written ``N(xM)``; every count is at
    least 1.  Raises :class:`LaunchEnvError` naming ``var`` otherwise."""
    counts: list[int] = []
    for item in value.strip().split(","):
        run = _RUN.fullmatch(item)
        if run is None:
            raise LaunchEnvError(
                f"{var}={value!r} is not a list of tasks per node: srun sets it to "
                f"counts of at least 1 separated by commas, a run of M nodes of N tasks "
                f"written N(xM) (e.g. '4(x2),3': two nodes of 4 tasks, then one of 3); "
                f"{item!r} is neither. Launch through srun, or, where you set it by "
                f"hand, write it so or unset it."
            )
        repeat = int(run[2] or 1)
        if len(counts) + repeat > _MOST_NODES:
            raise LaunchEnvError(
                f"{var}={value!r} counts the tasks of more than {_MOST_NODES} nodes, "
                f"more than SLURM runs in one job step. Launch through srun, or, where "
                f"you set it by hand, fix it or unset it."
            )
        counts += [int(run[1])] * repeat
    return tuple(counts)


def format_tasks_per_node(counts: Sequence[int]) -> str:
    """``counts`` (one per node, each at least 1) as SLURM writes them, runs
    of equal counts folded: ``(4, 4, 3)`` is ``"4(x2),3"``."""
    if not counts or min(counts) < 1:
        raise ValueError(f"a step runs at least one task on each of at least one node: {counts}")
    items: list[str] = []
    i = 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        items.append(str(counts[i]) if j - i == 1 else f"{counts[i]}(x{j - i})")
        i = j
    return ",".join(items)


def _slurm_node_size(env: Mapping[str, str]) -> tuple[str, int] | None:
    """(where it was read, for messages; the count) of this node's tasks
    under SLURM, or None where SLURM's variables do not describe the ranks
    (see :func:`_slurm_step`)."""
    step = _slurm_step(env)
    if step is None:
        return None
    var, counts, node = step
    return f"{var}[SLURM_NODEID={node}]", counts[node]


def _slurm_step(env: Mapping[str, str]) -> tuple[str, tuple[int, ...], int] | None:
    """(the variable read, the tasks per node, this task's node) of an srun
    step, checked, or None where SLURM's variables do not describe the
    ranks: outside an srun step, or where another launcher's (or hand-set
    RANK) take precedence, as a program that starts its own ranks inside
    each SLURM task sets them."""
    var = next((v for v in _TASKS_PER_NODE_VARS if v in env), None)
    if var is None or "SLURM_NODEID" not in env or not _in_srun_step(env):
        return None
    if any(v in env for v in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK")):
        return None
    counts = parse_tasks_per_node(env[var], var=var)
    node = _int(env, "SLURM_NODEID", "SLURM", minimum=0)
    if node >= len(counts):
        raise LaunchEnvError(
            f"SLURM_NODEID={node} is not a node of {var}={env[var]!r}, which counts "
            f"the tasks of {len(counts)} node(s): srun numbers a step's nodes from 0 to "
            f"{len(counts) - 1}. Launch through srun, or, where you set them by hand, "
            f"list one count per node."
        )
    if "SLURM_NTASKS" in env:
        tasks = _int(env, "SLURM_NTASKS", "SLURM")
        if sum(counts) != tasks:
            raise LaunchEnvError(
                f"{var}={env[var]!r} counts {sum(counts)} tasks, but SLURM_NTASKS={tasks}: "
                f"srun sets both for the same job step. Launch through srun, or, where "
                f"you set them by hand, make the counts add up to SLURM_NTASKS."
            )
    return var, counts, node


def node_ranks_from_env(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """This node's ranks by local rank, where the launcher fixes them, or None.

    torchrun gives each node's ranks in a row.  srun lays out a step's tasks
    over its nodes, with the counts of ``SLURM_STEP_TASKS_PER_NODE``, as
    ``SLURM_DISTRIBUTION`` says: block (in a row, node after node; srun's
    default ``*`` where tasks outnumber nodes, and where they do not each
    node has one task and the layouts agree) or cyclic (one to each node in
    turn, a full node skipped).  Another distribution (plane, arbitrary), a
    layout this rank's own ``SLURM_PROCID`` and ``SLURM_LOCALID``
    contradict, Open MPI's mapping (not in its variables) and hand-set
    ranks are None.  For naming the ranks a node waits for, before they
    have said where they run."""
    if "GROUP_RANK" in env and "LOCAL_WORLD_SIZE" in env and "RANK" in env:
        local, size = local_rank_from_env(env), local_world_size_from_env(env)
        if local is None or size is None:
            return None
        first = _int(env, "RANK", "torchrun") - local
        return tuple(range(first, first + size))
    step = _slurm_step(env)
    if step is None or "SLURM_LOCALID" not in env:
        return None
    _, counts, node = step
    how = env.get("SLURM_DISTRIBUTION", "*").split(",")[0].split(":")[0]
    known = how in ("*", "block", "cyclic")  # (* is srun's default: block)
    layout = slurm_layout(counts, cyclic=how == "cyclic") if known else None
    local = local_rank_from_env(env)
    if layout is None or local is None:
        return None
    ranks = layout[node]
    if local >= len(ranks) or ranks[local] != _int(env, "SLURM_PROCID", "SLURM"):
        return None
    return ranks


def slurm_layout(counts: Sequence[int], *, cyclic: bool) -> list[tuple[int, ...]]:
    """Each node's tasks, given its count of them: in a row, node after
    node, or (``cyclic``) one to each node in turn, skipping full nodes."""
    if not cyclic:
        ends = itertools.accumulate(counts)
        return [tuple(range(end - c, end)) for end, c in zip(ends, counts, strict=True)]
    nodes: list[list[int]] = [[] for _ in counts]
    task = 0
    for turn in range(max(counts, default=0)):
        for node, count in enumerate(counts):
            if turn < count:
                nodes[node].append(task)
                task += 1
    return [tuple(n) for n in nodes]


def local_rank_from_env(env: Mapping[str, str]) -> int | None:
    """LOCAL_RANK as any known launcher set it, or None.

    Raises :class:`LaunchEnvError` when it is not below the same launcher's
    count of ranks on the node."""
    for var in _LOCAL_RANK_VARS:
        if var in env:
            return _local_rank(env, var)
    return None


def node_key(env: Mapping[str, str]) -> str:
    """A string equal on the ranks of one node and different across nodes."""
    # torchrun's GROUP_RANK tells two agents apart even on one host (the
    # loopback two-node test relies on it); SLURM numbers its nodes; Open MPI
    # has no node id (OMPI_COMM_WORLD_NODE_RANK is a rank), so the host name,
    # also inside a SLURM allocation, whose SLURM_NODEID its ranks do not
    # share: those on mpirun's node have the batch step's, the others those
    # of the step srun started Open MPI's daemons in, numbered from 0 again.
    if "GROUP_RANK" in env:
        return f"GROUP_RANK={env['GROUP_RANK']}"
    if "SLURM_NODEID" in env and not open_mpi_ranks(env):
        return f"SLURM_NODEID={env['SLURM_NODEID']}"
    return f"host={socket.gethostname()}"


def open_mpi_ranks(env: Mapping[str, str]) -> bool:
    """Whether Open MPI started this rank: its variables, and not
    torchrun's, which detect_launch reads first."""
    return "OMPI_COMM_WORLD_RANK" in env and "RANK" not in env
