"""The first sync point of a job in which no process group exists yet.

Run under torchrun, or as plain processes with a launcher's variables
(``tests/test_startup.py`` does both): ``python startup.py SCENARIO TMPDIR
[ARG]``.  Each rank that reaches a sync point writes what came of it to
``TMPDIR/rank<R>.json`` (the error type, the ranks it names, how long it
waited, whether a process group existed afterwards); the ranks order
themselves with files in TMPDIR, and no wait for a file lasts longer than
``FILE_WAIT`` seconds.

Scenarios:
- ``late T``: rank 1 comes to the first sync point (``sd.barrier(timeout=T)``)
  only once every other rank is done with it.
- ``exits WHO:HOW``: rank WHO ends before the first sync point, once the
  others are on their way to it: ``exit`` (sys.exit(0)), ``raise`` (an
  uncaught OSError) or ``composition`` (catches a CompositionError and
  returns from main).  The others wait with the timeout in ``TIMEOUT``.
- ``kill``: rank 1 is SIGKILLed inside a ``@sd.barrier_after(timeout=5)``
  body, the first sync point.
- ``tensor``: the first sync point is an ``on_main_only(broadcast=True)``
  returning tensors; then the ranks use the group syncdeco made.
- ``user_group``: the program makes the group itself before any sync point.
- ``local_first``: 2 nodes; the first sync point is a local ``main_first``,
  which node 1 passes before node 0 comes to its own.
- ``init_late T``: ``sd.init(timeout=T)`` with rank 1 coming once the others
  are done with it.
- ``slow_main T``: the first sync point is a ``main_first(timeout=T)``
  whose body the main runs until every other rank has given up on it.
- ``restart``: under ``torchrun --max-restarts 1``: the first attempt leaves
  a frame of rank 1 and an exit notice of rank 0 in the agent's store; the
  second attempt's first sync point must not read them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import syncdeco as sd

FILE_WAIT = 20.0  # seconds: the longest any rank waits for another's file
TIMEOUT = 60.0  # a survivor's timeout where an exit must be heard sooner


def wait_for(path: Path) -> bool:
    """Whether ``path`` appeared within FILE_WAIT seconds."""
    end = time.monotonic() + FILE_WAIT
    while not path.exists():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def touch(path: Path) -> None:
    path.with_suffix(".tmp").write_text("")
    os.replace(path.with_suffix(".tmp"), path)


def record(tmp: Path, rank: int, facts: dict[str, Any]) -> None:
    path = tmp / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(facts))
    os.replace(path.with_suffix(".tmp"), path)


def attempt(fn: Callable[[], object]) -> dict[str, Any]:
    """What came of ``fn()``: its error (type, message, the ranks it names)
    or its value, how long it took, and whether a group exists after it."""
    start = time.monotonic()
    facts: dict[str, Any] = {"group_before": dist.is_initialized()}
    try:
        value = fn()
    except sd.SyncError as exc:
        facts["error"] = type(exc).__name__
        facts["message"] = str(exc)
        facts["missing"] = list(getattr(exc, "missing", ()))
        facts["named"] = getattr(exc, "rank", None)
        facts["exc_type"] = getattr(exc, "exc_type", None)
    else:
        facts["error"] = None
        facts["value"] = value if isinstance(value, list) else repr(value)
    facts["elapsed"] = time.monotonic() - start
    facts["group_after"] = dist.is_initialized()
    return facts


def main(scenario: str, tmp: Path, arg: str) -> None:
    rank, world_size = sd.rank(), sd.world_size()
    others = [r for r in range(world_size) if r != rank]
    if scenario in ("late", "init_late", "kill"):
        # Every rank but the main comes to the sync point after it, so that
        # a member's wait never runs out before the main's (it would then
        # rightly name the main as missing).
        if rank == 0:
            touch(tmp / "entering0")
        elif not wait_for(tmp / "entering0"):
            raise SystemExit(f"rank {rank}: rank 0 never came to the first sync point")
    if scenario in ("late", "init_late"):
        timeout = float(arg)

        def first() -> object:
            if scenario == "late":
                return sd.barrier("first", timeout=timeout)
            return sd.init(timeout=timeout)

        if rank == 1:
            facts = {"waited_for_others": all(wait_for(tmp / f"done{r}") for r in others)}
            facts.update(attempt(first))
        else:
            facts = attempt(first)
        record(tmp, rank, facts)
        touch(tmp / f"done{rank}")
        # Rank 0 may host the store: it stays until every rank is done.
        all(wait_for(tmp / f"done{r}") for r in others)
    elif scenario == "exits":
        who, how = arg.split(":")
        if rank == int(who):
            all(wait_for(tmp / f"entering{r}") for r in others)
            if how == "exit":
                sys.exit(0)
            if how == "raise":
                raise OSError("disk full while writing shard 7")
            try:
                sd.on_main_only(sd.barrier_after(lambda: None))
            except sd.CompositionError:
                return  # a caught mistake, and the program ends
            raise AssertionError("no CompositionError")
        touch(tmp / f"entering{rank}")
        timeout = float(os.environ.get("TIMEOUT", TIMEOUT))
        record(tmp, rank, attempt(lambda: sd.barrier("first", timeout=timeout)))
    elif scenario == "kill":

        @sd.barrier_after(timeout=5)
        def step() -> None:
            if sd.rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        record(tmp, rank, attempt(step))
    elif scenario == "tensor":

        @sd.on_main_only(broadcast=True)
        def make() -> dict[str, Any]:
            return {"w": torch.arange(12.0).reshape(3, 4), "n": 7}

        def made() -> list[object]:
            got = make()
            return [got["w"].tolist(), got["n"], type(got["w"]).__name__]

        facts = attempt(made)
        if facts["error"] is None:
            facts["second"] = made()  # a second one, over the group
        if dist.is_initialized():
            total = torch.tensor([float(rank + 1)])
            dist.all_reduce(total)
            facts["all_reduce"] = total.item()
            facts["group_size"] = dist.get_world_size()
            facts["group_rank"] = dist.get_rank()
        facts.update(after=attempt(lambda: sd.barrier("after", timeout=60)))
        record(tmp, rank, facts)
    elif scenario == "user_group":
        if "SLURM_PROCID" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
            addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
            dist.init_process_group(
                "gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size
            )
        else:
            dist.init_process_group("gloo")
        group = dist.group.WORLD
        store = dist.distributed_c10d._get_default_store()
        facts = attempt(lambda: sd.barrier("first", timeout=60))
        facts["same_group"] = dist.group.WORLD is group
        facts["same_store"] = dist.distributed_c10d._get_default_store() is store

        @sd.on_main_only(broadcast=True)
        def make() -> torch.Tensor:
            return torch.ones(3)

        facts["broadcast"] = make().tolist()
        facts["still_same_group"] = dist.group.WORLD is group
        record(tmp, rank, facts)
        sd.barrier("end", timeout=60)
        dist.destroy_process_group()
    elif scenario == "local_first":
        node = int(os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0")))
        if node == 0:  # node 1 passes its local sync point before node 0 comes to its own
            facts = {"node1_passed": all(wait_for(tmp / f"passed{r}") for r in (2, 3))}
        else:
            facts = {}
        facts.update(attempt(lambda: sd.main_first(local=True, name="local", timeout=30)(int)()))
        touch(tmp / f"passed{rank}")
        facts["world"] = attempt(lambda: sd.barrier("world", timeout=60))
        record(tmp, rank, facts)
    elif scenario == "slow_main":

        @sd.main_first(timeout=float(arg))
        def slow_body() -> str:
            if rank == 0:  # until every other rank has given up waiting for it
                all(wait_for(tmp / f"done{r}") for r in others)
            return "loaded"

        record(tmp, rank, attempt(slow_body))
        touch(tmp / f"done{rank}")
        all(wait_for(tmp / f"done{r}") for r in others)  # (rank 0 may host the store)
    elif scenario == "restart":
        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            # Leave a frame of rank 1 (at a point the next attempt will not
            # have) and an exit notice of rank 0 in the agent's store.
            if rank == 1:
                touch(tmp / "rank1-syncing")
                sd.barrier("stale", timeout=60)
            wait_for(tmp / "rank1-syncing")
            sys.exit(3)  # the agent restarts the job
        record(tmp, rank, attempt(lambda: sd.barrier("first", timeout=60)))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
