"""Run a function on N real Gloo ranks, each its own process.

    from syncdeco.testing import run_ranks

    def scenario(tmp):            # runs on every rank
        return sd.rank()

    def test_scenario(tmp_path):
        outcomes = run_ranks(scenario, 4, tmp_path)
        assert [o.unwrap() for o in outcomes] == [0, 1, 2, 3]

``run_ranks`` starts the ranks from a forkserver that has torch preloaded,
gives them a launcher's environment (torchrun's by default; SLURM's or Open
MPI's on request) pointing at a TCPStore this process hosts, initialises the
default Gloo process group unless told not to, calls ``fn(*args)`` on every
rank and returns each rank's :class:`Outcome`.  Ranks that have not finished
within ``timeout`` raise :class:`HungRanksError` with the stack each one was
stuck in; every process is gone when it returns.

``fn`` and ``args`` travel to the ranks by pickle, so ``fn`` must be defined at
module level.  The pytest plugin (``@pytest.mark.ranks(n)``) is built on it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import reprlib
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from ._env import format_tasks_per_node

__all__ = ["HungRanksError", "Outcome", "launcher_env", "run_ranks"]

Launcher = Literal["torchrun", "slurm", "ompi"]

_ctx = mp.get_context("forkserver")
# syncdeco._frozen last: it hides what the others loaded from the garbage
# collector, so that the ranks forked from the forkserver do not copy it.
_ctx.set_forkserver_preload(["torch", "torch.distributed", "syncdeco", "syncdeco._frozen"])


@dataclass
class Outcome:
    """What one rank's call came to: its return value, or the exception it
    raised and that exception's formatted traceback."""

    rank: int
    value: Any = None
    error: BaseException | None = None
    tb: str = field(default="", repr=False)

    def unwrap(self) -> Any:
        """The value, or an ``AssertionError`` carrying the rank's traceback."""
        if self.error is not None:
            raise AssertionError(f"rank {self.rank} raised:\n{self.tb}") from self.error
        return self.value


class HungRanksError(AssertionError):
    """Ranks died or did not finish within the timeout.  ``ranks`` names
    them; the message holds the stack each was stuck in and what the others
    finished with."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    init: bool = True,
    nodes: int = 1,
    launcher: Launcher = "torchrun",
    extra_env: Mapping[str, str] | None = None,
    dies: tuple[int, ...] = (),
) -> list[Outcome]:
    """Call ``fn(*args)`` on ``world_size`` Gloo ranks and return their
    outcomes, in rank order.

    ``launcher`` picks whose variables the ranks see ("torchrun", "slurm" or
    "ompi"), ``nodes`` how many simulated nodes of equal size they form
    (torchrun and SLURM only: Open MPI tells nodes apart by host name).
    Fail-fast (see ``syncdeco.init``) is off in the ranks unless
    ``SYNCDECO_FAIL_FAST`` is set here or in ``extra_env``: a rank that
    ends lets the others reach their sync point and raise there.
    Without ``init`` the ranks start bare, as a launched script does: no
    process group, and no meeting before ``fn``; under torchrun's variables
    this process hosts the store as torchrun's agent does, under SLURM's or
    Open MPI's rank 0 hosts it at MASTER_PORT (syncdeco does, at the first
    sync point) and this process hosts nothing.  Ranks in ``dies`` are expected to kill
    themselves: they must be gone, by SIGKILL, and get an Outcome with
    ``value="killed"``.  Raises :class:`HungRanksError` if a rank died
    otherwise, did not finish within ``timeout`` seconds, or finished but its
    process did not exit.
    """
    if world_size < 1 or world_size % nodes:
        raise ValueError(f"{world_size} ranks do not split into {nodes} equal nodes")
    from ._loopback import host_on_loopback  # imports torch

    store: Any = None
    if init or launcher == "torchrun":
        # as torchrun's agent hosts it, but on loopback: only these ranks connect
        store = host_on_loopback(world_size=world_size, seconds=300.0)
        port = store.port
    else:
        port = _free_port()  # rank 0 hosts the store there
    per_node = world_size // nodes
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="syncdeco-ranks-") as scratch:
        try:
            conns = []
            for rank in range(world_size):
                env = {
                    **os.environ,
                    **launcher_env(launcher, rank, world_size, per_node),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1",
                    # a rank's error, not its end by fail-fast: what a test asserts
                    "SYNCDECO_FAIL_FAST": os.environ.get("SYNCDECO_FAIL_FAST", "0"),
                    **(extra_env or {}),
                }
                parent, child = _ctx.Pipe(duplex=False)
                proc = _ctx.Process(
                    target=_child,
                    args=(fn, args, env, init, scratch, child, rank, world_size),
                    daemon=True,
                )
                proc.start()
                child.close()
                procs.append(proc)
                conns.append(parent)
            return _collect(procs, conns, timeout, dies, Path(scratch))
        finally:
            # _collect waited for every process to exit; what is left is hung,
            # and so is anything a rank started and left running.
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if proc.is_alive():  # not yet its own group leader: still starting
                    proc.kill()
                proc.join(5)
            del store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_env(launcher: Launcher, rank: int, world_size: int, per_node: int) -> dict[str, str]:
    """The variables ``launcher`` gives ``rank`` of ``world_size`` ranks
    spread over nodes of ``per_node`` ranks each."""
    local, node = rank % per_node, rank // per_node
    if launcher == "torchrun":
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(per_node),
            "GROUP_RANK": str(node),
            # all ranks are clients of the store run_ranks hosts
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    if launcher == "slurm":
        tasks = format_tasks_per_node([per_node] * (world_size // per_node))
        return {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(world_size),
            "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node),
            "SLURM_STEP_ID": "0",
            # what srun sets: the step's tasks on each node ("2(x2)")
            "SLURM_STEP_TASKS_PER_NODE": tasks,
            "SLURM_TASKS_PER_NODE": tasks,
        }
    if launcher == "ompi":
        return {
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": str(world_size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node),
            "OMPI_COMM_WORLD_NODE_RANK": str(local),  # what mpirun sets: not a node id
        }
    raise ValueError(f"unknown launcher {launcher!r}: pick 'torchrun', 'slurm' or 'ompi'")


def _child(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    env: dict[str, str],
    init: bool,
    scratch: str,
    conn: Any,
    rank: int,
    world_size: int,
) -> None:
    import torch.distributed as dist

    from ._plane import failfast
    from ._plane.group import SESSIONS, announce_exit

    # Its own process group, so that the parent can kill whatever it starts.
    os.setsid()
    # The forkserver's environment is the parent's when it started; the
    # parent sends its environment as it is now.
    os.environ.clear()
    os.environ.update(env)
    # On a hang the parent sends SIGUSR1 and shows where each rank was stuck.
    stacks = open(os.path.join(scratch, f"rank{rank}.stacks"), "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        try:
            if init:
                store = dist.TCPStore(  # type: ignore[attr-defined]
                    env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False
                )
                try:
                    dist.init_process_group(
                        "gloo",
                        store=store,
                        rank=rank,
                        world_size=world_size,
                        timeout=timedelta(seconds=120),
                    )
                finally:
                    _all_connected(store, world_size)
            out = Outcome(rank, value=fn(*args))
        except BaseException as exc:
            out = Outcome(rank, error=exc, tb=_format(exc))
        # What the interpreter's exit does for a syncdeco program (a forked
        # rank's exit does not): ranks still waiting at a sync point this one
        # will never reach raise RankExitedError now, not at their timeout.
        announce_exit(out.error)
        failfast.note_exit(out.error, convert=False)  # its node's ranks: no loss
        conn.send_bytes(_dumps(out))
    finally:
        if dist.is_initialized():
            # As at interpreter exit: the group a first sync point made is
            # up on every rank before this one closes its side of it.
            SESSIONS.await_group()
            dist.destroy_process_group()
        conn.close()


def _all_connected(store: Any, world_size: int) -> None:
    """Wait until every rank has left init_process_group.  Gloo connects the
    pairs there, and a rank whose test is over at once (no collective) would
    otherwise exit while a slower peer is still connecting to it, failing that
    peer's init with "Connection closed by peer".  A rank whose init raised
    arrives too, so the others do not wait for it."""
    if store.add("syncdeco.testing/connected", 1) == world_size:
        store.set("syncdeco.testing/all-connected", b"1")
    store.wait(["syncdeco.testing/all-connected"])


def _dumps(out: Outcome) -> bytes:
    # An outcome must also load in the parent: an exception whose __init__
    # takes other arguments than it keeps pickles but does not unpickle.
    try:
        payload = pickle.dumps(out)
        pickle.loads(payload)
        return payload
    except Exception:
        what = out.error if out.error is not None else out.value
        error = RuntimeError(f"{type(what).__name__} (not picklable): {what!r}")
        return pickle.dumps(Outcome(out.rank, error=error, tb=out.tb))


_HERE = os.path.dirname(os.path.abspath(__file__))


def _format(exc: BaseException) -> str:
    """The traceback without syncdeco's own frames (the harness, the
    decorators' machinery): what is left is the code under test."""
    report = traceback.TracebackException.from_exception(exc)
    for part in _chain(report):
        kept = [f for f in part.stack if not os.path.abspath(f.filename).startswith(_HERE + os.sep)]
        part.stack = traceback.StackSummary.from_list(kept or part.stack[-1:])
    return "".join(report.format())


def _chain(report: traceback.TracebackException) -> list[traceback.TracebackException]:
    parts, seen = [], set()
    todo: list[traceback.TracebackException | None] = [report]
    while todo:
        part = todo.pop()
        if part is None or id(part) in seen:
            continue
        seen.add(id(part))
        parts.append(part)
        todo += [part.__cause__, part.__context__]
    return parts


def _collect(
    procs: list[Any], conns: list[Any], timeout: float, dies: tuple[int, ...], scratch: Path
) -> list[Outcome]:
    world_size = len(procs)
    outcomes: list[Outcome | None] = [None] * world_size
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    for rank, conn in enumerate(conns):
        if conn.poll(left()):
            try:
                outcomes[rank] = pickle.loads(conn.recv_bytes())
            except EOFError:
                pass
            except Exception as exc:  # the child checked it loads; this is a last resort
                outcomes[rank] = Outcome(rank, error=RuntimeError(f"outcome did not load: {exc!r}"))
    for rank in dies:
        procs[rank].join(left())
        if outcomes[rank] is None and procs[rank].exitcode == -signal.SIGKILL:
            outcomes[rank] = Outcome(rank, value="killed")
    stuck = []
    for rank, proc in enumerate(procs):
        proc.join(left())
        if proc.is_alive() and outcomes[rank] is not None:
            stuck.append(rank)
    if stuck:
        raise HungRanksError(
            f"rank(s) {stuck} finished but their process did not exit within {timeout}s\n"
            + _stacks(procs, stuck, scratch),
            stuck,
        )
    hung = [r for r, o in enumerate(outcomes) if o is None]
    if hung:
        raise HungRanksError(
            f"rank(s) {hung} of {world_size} died or did not finish within {timeout}s\n"
            + _stacks(procs, hung, scratch)
            + "".join(_finished(o) for o in outcomes if o is not None),
            hung,
        )
    return [o for o in outcomes if o is not None]


def _finished(outcome: Outcome) -> str:
    if outcome.tb:
        return f"\n--- rank {outcome.rank} raised ---\n{outcome.tb}"
    return f"\n--- rank {outcome.rank} returned {reprlib.repr(outcome.value)} ---"


def _stacks(procs: list[Any], ranks: list[int], scratch: Path) -> str:
    for rank in ranks:
        if procs[rank].is_alive():
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(1.0)  # let faulthandler write; only on the failure path
    out = []
    for rank in ranks:
        path = scratch / f"rank{rank}.stacks"
        text = path.read_text() if path.exists() else ""
        stack = text or "(no stack: the process had exited)"
        out.append(f"--- rank {rank} of {len(procs)} ---\n{stack}")
    return "\n".join(out)
