"""Run a function on N real Gloo ranks, each its own process.

``run_ranks(fn, n)`` starts n processes from a forkserver that has torch
preloaded, gives them torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT pointing at a TCPStore this process hosts), initialises the
default process group unless told not to, calls ``fn(tmp)`` on every rank and
returns each rank's :class:`Outcome`.  A rank that has not finished within
``timeout`` fails the test; every process is gone when it returns.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "torch.distributed", "syncdeco"])


@dataclass
class Outcome:
    rank: int
    value: Any = None
    error: BaseException | None = None
    tb: str = ""

    def unwrap(self) -> Any:
        if self.error is not None:
            raise AssertionError(f"rank {self.rank} raised:\n{self.tb}") from self.error
        return self.value


def _child(
    fn: Callable[[Path], Any],
    env: dict[str, str],
    init: bool,
    tmp: str,
    conn: Any,
    rank: int,
    world_size: int,
) -> None:
    os.environ.update(env)
    # On a hang the parent sends SIGUSR1 and shows where each rank was stuck.
    stacks = open(os.path.join(tmp, f".rank{rank}.stacks"), "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        if init:
            store = dist.TCPStore(
                env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False
            )
            dist.init_process_group(
                "gloo",
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=120),
            )
        try:
            out = Outcome(rank, value=fn(Path(tmp)))
        except BaseException as exc:
            out = Outcome(rank, error=exc, tb=traceback.format_exc())
        try:
            payload = pickle.dumps(out)
        except Exception:
            payload = pickle.dumps(
                Outcome(rank, error=RuntimeError(repr(out.error or out.value)), tb=out.tb)
            )
        conn.send_bytes(payload)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def run_ranks(
    fn: Callable[[Path], Any],
    world_size: int,
    tmp_path: Path,
    *,
    timeout: float = 90.0,
    init: bool = True,
    nodes: int = 1,
    launcher: str = "torchrun",
    extra_env: Mapping[str, str] | None = None,
    dies: tuple[int, ...] = (),
) -> list[Outcome]:
    """Run ``fn(tmp_path)`` on ``world_size`` Gloo ranks and return their
    outcomes.  ``launcher`` picks whose variables the ranks see ("torchrun",
    "slurm" or "ompi"), ``nodes`` how many simulated nodes of equal size they
    form (torchrun and SLURM only: Open MPI tells nodes apart by host name).
    Without ``init`` the ranks start with no process group (torchrun only).
    Ranks in ``dies`` are expected to kill themselves: they must be gone, by
    SIGKILL, and get an Outcome with ``error=None`` and ``value="killed"``."""
    if not init and launcher != "torchrun":
        raise ValueError("only torchrun's environment lets syncdeco create the group here")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    per_node = world_size // nodes
    procs = []
    conns = []
    try:
        for rank in range(world_size):
            env = {
                **_launcher_env(launcher, rank, world_size, per_node),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "OMP_NUM_THREADS": "1",
                **(extra_env or {}),
            }
            parent, child = _ctx.Pipe(duplex=False)
            proc = _ctx.Process(
                target=_child,
                args=(fn, env, init, str(tmp_path), child, rank, world_size),
                daemon=True,
            )
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        outcomes: list[Outcome | None] = [None] * world_size
        deadline = _now() + timeout
        for rank, conn in enumerate(conns):
            if conn.poll(max(0.0, deadline - _now())):
                try:
                    outcomes[rank] = pickle.loads(conn.recv_bytes())
                except EOFError:
                    pass
        for rank in dies:
            procs[rank].join(max(0.0, deadline - _now()))
            if outcomes[rank] is None and procs[rank].exitcode == -signal.SIGKILL:
                outcomes[rank] = Outcome(rank, value="killed")
        stuck = []
        for rank, proc in enumerate(procs):
            proc.join(max(0.0, deadline - _now()))
            if proc.is_alive() and outcomes[rank] is not None:
                stuck.append(rank)
        if stuck:
            pytest.fail(
                f"rank(s) {stuck} finished but their process did not exit within "
                f"{timeout}s\n" + _stacks(procs, stuck, tmp_path)
            )
        hung = [r for r, o in enumerate(outcomes) if o is None]
        if hung:
            pytest.fail(
                f"rank(s) {hung} of {world_size} died or did not finish within "
                f"{timeout}s\n"
                + _stacks(procs, hung, tmp_path)
                + "".join(
                    f"\n--- rank {o.rank} finished ---\n{o.tb or repr(o.value)}"
                    for o in outcomes
                    if o is not None
                )
            )
        return [o for o in outcomes if o is not None]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        del store


def _launcher_env(launcher: str, rank: int, world_size: int, per_node: int) -> dict[str, str]:
    local, node = rank % per_node, rank // per_node
    if launcher == "torchrun":
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(per_node),
            "GROUP_RANK": str(node),
            # all ranks are clients of the store this process hosts
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    if launcher == "slurm":
        return {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(world_size),
            "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node),
            "SLURM_STEP_ID": "0",
        }
    if launcher == "ompi":
        return {
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": str(world_size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node),
            "OMPI_COMM_WORLD_NODE_RANK": str(local),  # what mpirun sets: not a node id
        }
    raise ValueError(f"unknown launcher {launcher!r}")


def _now() -> float:
    return time.monotonic()


def _stacks(procs: list[Any], ranks: list[int], tmp_path: Path) -> str:
    for rank in ranks:
        if procs[rank].is_alive():
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(1.0)  # let faulthandler write; only on the failure path
    out = []
    for rank in ranks:
        path = tmp_path / f".rank{rank}.stacks"
        text = path.read_text() if path.exists() else ""
        out.append(f"--- rank {rank} ---\n{text or '(no stack: the process had exited)'}")
    return "\n".join(out)
