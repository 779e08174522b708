"""Bad input at startup: a launcher's variables that cannot describe a job,
and timeouts that are not a number of seconds.  Each is refused with the
variable or option named and what to do, before any process group exists;
``math.inf`` is accepted as "wait forever"."""

from __future__ import annotations

import itertools
import math
import socket
import sys
from collections.abc import Callable
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncdeco as sd
from syncdeco._backend import resolve_timeout
from syncdeco._env import (
    detect_launch,
    format_tasks_per_node,
    local_rank_from_env,
    local_world_size_from_env,
    node_key,
    node_ranks_from_env,
    parse_tasks_per_node,
    slurm_layout,
)
from syncdeco._plane.group import _place
from syncdeco._plane.protocol import Place
from syncdeco._startup import namespace

LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "SLURM_NODEID",
    "SLURM_TASKS_PER_NODE",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_DISTRIBUTION",
)

ADDR = {"MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
SRUN = {"SLURM_STEP_ID": "0"}


def _launch_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Make ``env`` this process's launcher environment, and nothing else."""
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# -- a job of no ranks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, var, how",
    [
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE", "--nnodes times --nproc-per-node"),
        ({"RANK": "0", "WORLD_SIZE": "-2"}, "WORLD_SIZE", "--nnodes times --nproc-per-node"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0", **SRUN}, "SLURM_NTASKS", "--ntasks N"),
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "0"},
            "OMPI_COMM_WORLD_SIZE",
            "-n N",
        ),
    ],
)
def test_a_world_of_no_ranks_says_what_to_do(
    env: dict[str, str], var: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(sd.LaunchEnvError) as info:
        detect_launch(env)
    message = str(info.value)
    assert message.startswith(f"{var}={env[var]!r}, but a job has at least one rank"), message
    assert how in message  # how the launcher counts ranks
    assert (
        "1 for a single process" in message and f"or unset {next(iter(env))} and {var}" in message
    )
    _launch_with(monkeypatch, env)
    for call in (sd.rank, sd.world_size, sd.local_rank, lambda: sd.barrier("start")):
        with pytest.raises(sd.LaunchEnvError, match=f"^{var}="):
            call()  # the first call that needs the job says so, every time


# -- a local rank beyond its node ------------------------------------------------------


@pytest.mark.parametrize(
    "env, refusal",
    [
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **ADDR},
            "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2: torchrun numbers the ranks on a "
            "node from 0 to 1",
        ),
        (
            # no LOCAL_WORLD_SIZE: a node cannot hold more ranks than the job
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "4", **ADDR},
            "LOCAL_RANK=4 is not below WORLD_SIZE=4: torchrun numbers the ranks on a node "
            "from 0 to 3",
        ),
        (
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1"},
            "LOCAL_RANK=1 is not below WORLD_SIZE=1",
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_LOCAL_RANK": "4",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                **ADDR,
            },
            "OMPI_COMM_WORLD_LOCAL_RANK=4 is not below OMPI_COMM_WORLD_LOCAL_SIZE=4: Open MPI",
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                **ADDR,
            },
            "OMPI_COMM_WORLD_LOCAL_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2: Open MPI",
        ),
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "2", **SRUN, **ADDR},
            "SLURM_LOCALID=2 is not below SLURM_NTASKS=2: SLURM numbers the ranks on a node "
            "from 0 to 1",
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0", **ADDR},
            "LOCAL_WORLD_SIZE='0', but this process's node runs at least one rank",
        ),
    ],
)
def test_a_local_rank_beyond_its_node_is_refused(
    env: dict[str, str], refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(sd.LaunchEnvError) as info:
        detect_launch(env)
    message = str(info.value)
    assert message.startswith(refusal), message
    assert "Launch through" in message  # and what to do
    _launch_with(monkeypatch, env)
    with pytest.raises(sd.LaunchEnvError, match="^" + refusal.split(":")[0].split(",")[0]):
        sd.local_rank()


@pytest.mark.parametrize(
    "env, var",
    [
        (
            {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
        ),
        (
            {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"},
            "OMPI_COMM_WORLD_LOCAL_RANK=3 is not below OMPI_COMM_WORLD_LOCAL_SIZE=1",
        ),
        ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0', but"),
    ],
)
def test_the_node_facts_of_a_group_made_elsewhere_are_checked_too(
    env: dict[str, str], var: str
) -> None:
    # Where the user or a framework made the process group, syncdeco reads
    # only the node variables (to find a node's ranks for local=True).
    with pytest.raises(sd.LaunchEnvError, match="^" + var):
        (local_rank_from_env(env), local_world_size_from_env(env))


@pytest.mark.parametrize(
    "env, local",
    [
        ({"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", **ADDR}, 3),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", **ADDR}, 3),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", **SRUN, **ADDR}, 3),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", **SRUN}, 0),
    ],
)
def test_the_last_local_rank_of_a_node_is_accepted(env: dict[str, str], local: int) -> None:
    launch = detect_launch(env)
    assert launch is not None and launch.local_rank == local
    assert local_rank_from_env(env) == local


# -- SLURM's tasks per node ----------------------------------------------------------


@pytest.mark.parametrize(
    "value, counts",
    [
        ("1", (1,)),
        ("4", (4,)),
        ("4(x2)", (4, 4)),
        ("4(x2),3", (4, 4, 3)),
        ("3,4(x2)", (3, 4, 4)),
        ("2(x3),1,8(x1),2", (2, 2, 2, 1, 8, 2)),
        ("16(x128)", (16,) * 128),
        (" 4(x2),3\n", (4, 4, 3)),  # around the value, as a shell may leave it
    ],
)
def test_tasks_per_node_are_read_as_slurm_writes_them(value: str, counts: tuple[int, ...]) -> None:
    assert parse_tasks_per_node(value) == counts


def test_tasks_per_node_for_more_nodes_than_a_step_has_are_refused() -> None:
    with pytest.raises(sd.LaunchEnvError, match=r"counts the tasks of more than 1048576 nodes"):
        parse_tasks_per_node("4(x1048576),4", var="SLURM_TASKS_PER_NODE")
    assert len(parse_tasks_per_node("4(x1048576)")) == 1 << 20


@pytest.mark.parametrize(
    "value, item",
    [
        ("", "''"),
        ("4,", "''"),
        (",4", "''"),
        ("4(x2),,3", "''"),
        ("0", "'0'"),
        ("4,0", "'0'"),
        ("4(x0)", "'4(x0)'"),
        ("04", "'04'"),
        ("-1", "'-1'"),
        ("4(2)", "'4(2)'"),
        ("4(x2", "'4(x2'"),
        ("4x2", "'4x2'"),
        ("4 (x2)", "'4 (x2)'"),
        ("4(x2)(x3)", "'4(x2)(x3)'"),
        ("four", "'four'"),
        ("4;3", "'4;3'"),
        ("٤", "'٤'"),  # a digit to int(), not to srun
    ],
)
def test_malformed_tasks_per_node_are_refused_with_the_variable_named(
    value: str, item: str
) -> None:
    with pytest.raises(sd.LaunchEnvError) as info:
        parse_tasks_per_node(value, var="SLURM_STEP_TASKS_PER_NODE")
    message = str(info.value)
    head = f"SLURM_STEP_TASKS_PER_NODE={value!r} is not a list of tasks per node"
    assert message.startswith(head), message
    assert f"{item} is neither" in message and "'4(x2),3'" in message  # what was expected
    assert "Launch through srun" in message


@settings(deadline=None)  # milliseconds each, but the machine may be loaded
@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40))
def test_tasks_per_node_formatted_then_read_are_the_same(counts: list[int]) -> None:
    text = format_tasks_per_node(counts)
    assert parse_tasks_per_node(text) == tuple(counts)
    # folded as SLURM folds them: no two neighbouring items repeat a count
    items = [item.split("(")[0] for item in text.split(",")]
    assert all(a != b for a, b in itertools.pairwise(items))


SLURM_STEP = {"SLURM_PROCID": "5", "SLURM_NTASKS": "11", **SRUN, **ADDR}


@pytest.mark.parametrize(
    "env, size",
    [
        ({**SLURM_STEP, "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3"}, 4),
        ({**SLURM_STEP, "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3"}, 3),
        ({**SLURM_STEP, "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "4(x2),3"}, 3),
        (  # the step's own layout wins over the job's
            {
                **SLURM_STEP,
                "SLURM_NODEID": "1",
                "SLURM_STEP_TASKS_PER_NODE": "3,8",
                "SLURM_TASKS_PER_NODE": "4(x2),3",
            },
            8,
        ),
        # no node id, or no srun step (an sbatch script): SLURM says nothing
        ({**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "4(x2),3"}, None),
        (
            {"SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_STEP_ID": "batch"},
            None,
        ),
        # ranks another launcher (or the program, with RANK) describes: theirs
        (
            {
                "RANK": "0",
                "WORLD_SIZE": "8",
                **ADDR,
                **SRUN,
                "SLURM_NODEID": "0",
                "SLURM_TASKS_PER_NODE": "1(x2)",
            },
            None,
        ),
        (
            {
                "RANK": "0",
                "WORLD_SIZE": "8",
                "LOCAL_WORLD_SIZE": "4",
                **ADDR,
                **SRUN,
                "SLURM_NODEID": "0",
                "SLURM_TASKS_PER_NODE": "1(x2)",
            },
            4,
        ),
    ],
)
def test_a_slurm_node_runs_the_tasks_srun_gave_it(env: dict[str, str], size: int | None) -> None:
    assert local_world_size_from_env(env) == size


def _task(procid: int, node: int, local: int, **more: str) -> dict[str, str]:
    """SLURM's variables for task ``procid`` of an 11-task step on nodes of
    4, 4 and 3 tasks."""
    where = {"SLURM_NODEID": str(node), "SLURM_LOCALID": str(local)}
    layout = {"SLURM_STEP_TASKS_PER_NODE": "4(x2),3"}
    return {**SLURM_STEP, "SLURM_PROCID": str(procid), **where, **layout, **more}


@pytest.mark.parametrize(
    "env, ranks",
    [
        # torchrun: each node's ranks in a row
        (
            {"RANK": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
            | {"GROUP_RANK": "1", **ADDR},
            (4, 5, 6, 7),
        ),
        # srun: block (its default) and cyclic, as SLURM_DISTRIBUTION says
        (_task(5, 1, 1), (4, 5, 6, 7)),
        (_task(5, 1, 1, SLURM_DISTRIBUTION="block:cyclic"), (4, 5, 6, 7)),
        (_task(5, 1, 1, SLURM_DISTRIBUTION="*:cyclic"), (4, 5, 6, 7)),
        (_task(4, 1, 1, SLURM_DISTRIBUTION="cyclic"), (1, 4, 7, 10)),
        (_task(8, 2, 2, SLURM_DISTRIBUTION="cyclic:block,Pack"), (2, 5, 8)),
        # a layout the task's own rank contradicts, or one not known: none
        (_task(4, 1, 1), None),
        (_task(4, 1, 1, SLURM_DISTRIBUTION="plane"), None),
        (_task(4, 1, 1, SLURM_DISTRIBUTION="arbitrary"), None),
        # hand-set ranks without torchrun's agent, Open MPI: not known
        (
            {"RANK": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", **ADDR},
            None,
        ),
        (
            {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}
            | {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", **ADDR},
            None,
        ),
    ],
)
def test_a_nodes_ranks_are_known_where_the_launcher_fixes_them(
    env: dict[str, str], ranks: tuple[int, ...] | None
) -> None:
    assert node_ranks_from_env(env) == ranks


def test_a_rank_knows_its_nodes_ranks_from_its_launcher() -> None:
    env = _task(4, 1, 1, SLURM_DISTRIBUTION="cyclic")
    assert _place(env, 4) == Place("SLURM_NODEID=1", 1, 4, (1, 4, 7, 10))
    assert _place({**env, "SLURM_DISTRIBUTION": "plane"}, 4).ranks is None


@given(st.lists(st.integers(1, 9), min_size=1, max_size=12), st.booleans())
def test_srun_deals_every_task_to_one_node(counts: list[int], cyclic: bool) -> None:
    nodes = slurm_layout(counts, cyclic=cyclic)
    assert [len(n) for n in nodes] == counts
    assert sorted(r for n in nodes for r in n) == list(range(sum(counts)))
    # each node's tasks in order: block, a run; cyclic, each turn goes round
    # the nodes that still take tasks, in node order
    assert all(list(n) == sorted(n) for n in nodes)
    if not cyclic:
        assert all(n[-1] - n[0] == len(n) - 1 for n in nodes)
    else:
        dealt = [n[turn] for turn in range(max(counts)) for n in nodes if turn < len(n)]
        assert dealt == list(range(sum(counts)))


@pytest.mark.parametrize(
    "env, refusal",
    [
        (
            {**SLURM_STEP, "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3"},
            "SLURM_NODEID=3 is not a node of SLURM_STEP_TASKS_PER_NODE='4(x2),3', which "
            "counts the tasks of 3 node(s): srun numbers a step's nodes from 0 to 2",
        ),
        (
            {**SLURM_STEP, "SLURM_NODEID": "-1", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3"},
            "SLURM_NODEID='-1' must be at least 0",
        ),
        (
            {**SLURM_STEP, "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x3),3"},
            "SLURM_STEP_TASKS_PER_NODE='4(x3),3' counts 15 tasks, but SLURM_NTASKS=11",
        ),
        (
            {**SLURM_STEP, "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "4(x2),3)"},
            "SLURM_TASKS_PER_NODE='4(x2),3)' is not a list of tasks per node",
        ),
    ],
)
def test_slurm_node_facts_that_disagree_are_refused(env: dict[str, str], refusal: str) -> None:
    with pytest.raises(sd.LaunchEnvError) as info:
        local_world_size_from_env(env)
    assert str(info.value).startswith(refusal), str(info.value)


def test_a_slurm_local_rank_beyond_its_node_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        **SLURM_STEP,
        "SLURM_NODEID": "2",
        "SLURM_LOCALID": "3",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),3",
    }
    refusal = (
        "SLURM_LOCALID=3 is not below SLURM_STEP_TASKS_PER_NODE[SLURM_NODEID=2]=3: SLURM "
        "numbers the ranks on a node from 0 to 2"
    )
    with pytest.raises(sd.LaunchEnvError) as info:
        detect_launch(env)
    assert str(info.value).startswith(refusal), str(info.value)
    _launch_with(monkeypatch, env)
    with pytest.raises(sd.LaunchEnvError, match=r"^SLURM_LOCALID=3 is not below"):
        sd.local_rank()
    assert local_rank_from_env({**env, "SLURM_LOCALID": "2"}) == 2


# -- timeouts ------------------------------------------------------------------------


class _Recording:
    """A one-rank backend that keeps the timeout each sync point was given."""

    def __init__(self) -> None:
        self.timeouts: list[tuple[str, float | None]] = []

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def local_rank(self) -> int:
        return 0

    def sync(self, point: sd.SyncPoint, *, timeout: float | None, **kw: object) -> object:
        self.timeouts.append((point.kind, timeout))
        return kw["payload"]


FOREVER = [
    pytest.param(math.inf, id="inf"),
    pytest.param(float("inf"), id="float-inf"),
    pytest.param(timedelta.max, id="timedelta.max"),
    pytest.param(sys.maxsize, id="sys.maxsize"),
    pytest.param(1e9, id="32-years"),
]


@pytest.mark.parametrize("forever", FOREVER)
def test_an_infinite_timeout_waits_forever_as_none_does(forever: float | timedelta) -> None:
    assert resolve_timeout(forever) is None
    rec = _Recording()

    @sd.barrier_after(timeout=forever)
    @sd.main_first(timeout=forever)
    @sd.on_main_only(broadcast=True, timeout=forever)
    def load() -> int:
        return 7

    with sd.use_backend(rec):
        assert load() == 7
        with sd.main_first(timeout=forever):
            pass
        sd.barrier("end", timeout=forever)
    assert rec.timeouts == [
        ("on_main_only", None),
        ("barrier_after", None),
        ("main_first", None),
        ("barrier", None),
    ]
    sd.init(rec, timeout=forever, warn_after=forever)
    sd.barrier("default")
    assert rec.timeouts[-1] == ("barrier", None)


def test_a_long_finite_timeout_is_kept() -> None:
    assert resolve_timeout(timedelta(days=365)) == 365 * 86400.0
    assert resolve_timeout(1e9 - 1) == 1e9 - 1


BAD = [
    pytest.param(math.nan, "must be a number of seconds, got nan", id="nan"),
    pytest.param(-math.inf, "must be positive, got -inf", id="-inf"),
    pytest.param(-1, "must be positive, got -1", id="negative"),
    pytest.param(0, "must be positive, got 0", id="zero"),
    pytest.param(timedelta(seconds=-5), "must be positive, got -5.0", id="negative-timedelta"),
]


@pytest.mark.parametrize("timeout, why", BAD)
def test_a_timeout_that_is_no_wait_is_refused_when_decorating(timeout: float, why: str) -> None:
    faces: dict[str, Callable[[], object]] = {
        "main_first": lambda: sd.main_first(timeout=timeout),
        "barrier_after": lambda: sd.barrier_after(timeout=timeout),
        "on_main_only": lambda: sd.on_main_only(broadcast=True, timeout=timeout),
    }
    for face, decorate in faces.items():
        with pytest.raises(ValueError) as info:
            decorate()
        message = str(info.value)
        assert message.startswith(f"{face}(timeout=...) {why}"), (face, message)
        assert message.endswith("or None (or math.inf) to wait forever"), (face, message)
    rec = _Recording()
    with sd.use_backend(rec), pytest.raises(ValueError, match=rf"^barrier\(timeout=\.\.\.\) {why}"):
        sd.barrier("now", timeout=timeout)  # a plain call: checked when called
    assert rec.timeouts == []  # refused before any rank waits
    with pytest.raises(ValueError, match=rf"^init\(timeout=\.\.\.\) {why}"):
        sd.init("null", timeout=timeout)
    with pytest.raises(ValueError, match=rf"^init\(warn_after=\.\.\.\) {why}"):
        sd.init("null", warn_after=timeout)


# -- on real ranks -----------------------------------------------------------------


@pytest.mark.ranks(2, timeout=60)
def test_infinite_timeouts_on_real_ranks() -> None:
    # Before math.inf meant None, the wait under a sync point overflowed.
    @sd.on_main_only(broadcast=True, timeout=math.inf)
    def load() -> int:
        return 7

    assert load() == 7
    with sd.main_first(timeout=math.inf):
        pass
    sd.barrier("end", timeout=math.inf)


def test_open_mpi_ranks_in_a_slurm_allocation_share_a_node_key_and_a_namespace() -> None:
    # mpirun inside sbatch: its own node's ranks have the batch step's SLURM
    # variables, the other nodes' those of the step srun started Open MPI's
    # daemons in, whose nodes are numbered from 0 again.  Neither may split
    # a job (the key prefix) nor merge two hosts into one node.
    ompi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "SLURM_JOB_ID": "7"}
    here = {**ompi, "SLURM_NODEID": "0", "SLURM_STEP_ID": "4294967294"}
    there = {**ompi, "OMPI_COMM_WORLD_RANK": "2", "SLURM_NODEID": "0", "SLURM_STEP_ID": "0"}
    assert node_key(here) == node_key(there) == f"host={socket.gethostname()}"
    assert namespace(here) == namespace(there) == "syncdeco-job/SLURM_JOB_ID=7/"
    # srun's own ranks keep SLURM's node numbers and step
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"}
    assert node_key(srun) == "SLURM_NODEID=1"
    step = "syncdeco-job/SLURM_JOB_ID=7,SLURM_STEP_ID=0/"
    assert namespace({**srun, "SLURM_JOB_ID": "7"}) == step
    # and torchrun inside srun, its agents' group ranks
    assert node_key({**srun, "RANK": "1", "GROUP_RANK": "1"}) == "GROUP_RANK=1"
