"""One rank's process ends while the others go on to sync points it never
reaches.  Run as plain processes with a launcher's variables and no agent
that would stop the others: ``python exits.py SCENARIO TMPDIR``.

Scenarios:
- ``member_raises``: rank 1 raises outside any sync point; the others try
  two sync points.
- ``main_returns``: rank 0's program ends early.
- ``local_member_exits``: rank 3, on the second node, calls sys.exit()
  before a local sync point.
- ``sync_at_exit``: every rank meets in an atexit handler registered after
  ``import syncdeco`` but before its first use.
- ``killed_at_exit``: as ``sync_at_exit``, but in the handler rank 1 is
  SIGKILLed while rank 0 waits with no timeout.
- ``main_ends_first``: a correct program whose rank 0 (hosting the store
  under SLURM's variables) exits before the others do.
- ``store_host_gone``: the same, but the others then try a sync point.
- ``blocked_on_a_slow_member``: rank 0 waits for a slow rank 1 while rank 2
  has exited.
- ``killed_member``, ``killed_main``, ``killed_local``: rank 1 (rank 0)
  is SIGKILLed while the others wait with no timeout (at a local sync
  point).
- ``daemon_member_waits``, ``daemon_main_waits``: rank 1 (rank 0) exits
  while a daemon thread of it waits at a sync point, which the other rank
  joins once that process is gone.
- ``node_main_killed``: four ranks on two nodes (SLURM's variables); rank
  2, the second node's main, which hosts its node's store, is SIGKILLed
  right after a world sync point; rank 3 goes on to a local sync point with
  no timeout (it may have lost the node's store already, as it read that
  world sync point's verdict there).
- ``store_host_killed_with_tiers``: four ranks on two nodes (SLURM's
  variables); rank 0, which hosts the job's store, is SIGKILLed while the
  second node waits for its verdict, its main (rank 2) on the job's store,
  rank 3 on its node's store for rank 2's relay.
- ``stuck_then_main_ends_first``: four ranks on two nodes (SLURM's
  variables: the node tier is up from the second world sync point); rank 3
  is busy in a user function while the others time out, then rank 0 (which
  hosts the store) ends first and the others after it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import syncdeco as sd


def say(msg: str) -> None:
    print(f"[rank {sd.rank()}] {msg}\n", end="", flush=True)


def meet(name: str, local: bool = False) -> None:
    if local:
        with sd.main_first(local=True, name=name, timeout=300):
            pass
    else:
        sd.barrier(name, timeout=300)


def try_to_meet(name: str, local: bool = False) -> None:
    try:
        meet(name, local)
    except sd.RankExitedError as exc:
        say(f"{type(exc).__name__} rank={exc.rank} exc_type={exc.exc_type!r}: {exc}")
    else:
        say(f"passed {name}")


def killed(tmp: Path, victim: int, scenario: str) -> None:
    """Rank ``victim`` is SIGKILLed (no exit handler runs) while the others
    wait with no timeout: the ranks of its host see its process end."""
    # Every rank's Gloo group is up after a second sync point (a kill
    # while another rank still connects its side fails that one there).
    meet("ready")
    if sd.rank() == victim:
        (tmp / "killed-at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        if scenario == "killed_local":
            with sd.main_first(local=True, name="after the kill", timeout=None):
                pass
        else:
            sd.barrier("after the kill", timeout=None)
    except sd.RankKilledError as exc:
        took = time.time() - float((tmp / "killed-at").read_text())
        say(f"{type(exc).__name__} rank={exc.rank} within {took:.1f}s: {exc}")


def main(scenario: str, tmp: Path) -> None:
    if scenario == "sync_at_exit":
        atexit.register(lambda: (meet("shutdown"), say("met at shutdown")))
    if scenario == "killed_at_exit":
        atexit.register(lambda: killed(tmp, 1, "at exit"))
    local = scenario.startswith("local")
    meet("start", local)
    if scenario == "member_raises":
        if sd.rank() == 1:
            raise OSError("disk full while writing shard 7")
        try_to_meet("next")
        try_to_meet("again")  # rank 1 is still gone
    elif scenario == "main_returns":
        if sd.rank() != 0:
            try_to_meet("next")
    elif scenario == "local_member_exits":
        if sd.rank() == 3:
            sys.exit(0)
        try_to_meet("next", local)
    elif scenario == "killed_at_exit":
        meet("ready")  # (the handler does the rest)
    elif scenario.startswith("killed_"):
        killed(tmp, 0 if scenario == "killed_main" else 1, scenario)
    elif scenario == "blocked_on_a_slow_member":
        # Rank 2 exits; rank 1 comes only once rank 0 has given up, so rank 0
        # must hear of rank 2 while it waits for rank 1's frame.
        if sd.rank() == 2:
            raise OSError("disk full")
        if sd.rank() == 1:
            _wait_for(tmp / "rank0-heard")
        try_to_meet("next")
        if sd.rank() == 0:
            (tmp / "rank0-heard").write_text("")
    elif scenario in ("daemon_member_waits", "daemon_main_waits"):
        # One rank's main thread ends while a daemon thread of it waits at a
        # sync point (a member: its frame sent; a main: waiting for frames),
        # which the other rank joins only once that process is gone.
        leaver = 1 if scenario == "daemon_member_waits" else 0
        if sd.rank() == leaver:
            import threading

            from syncdeco._plane import group

            threading.Thread(target=meet, args=("background",), daemon=True).start()
            session = group.current()
            assert session is not None
            exchange = session.exchange

            def waiting() -> bool:
                return exchange.waiting is not None

            _until("the daemon thread to wait at its sync point", waiting)
            (tmp / "leaver.pid.tmp").write_text(str(os.getpid()))
            os.replace(tmp / "leaver.pid.tmp", tmp / "leaver.pid")
            return
        pid = int(_wait_for(tmp / "leaver.pid"))
        _until(f"rank {leaver} (pid {pid}) to exit", lambda: not _alive(pid))
        say(f"rank {leaver} has exited")
        try_to_meet("background")
        try_to_meet("next")
    elif scenario == "node_main_killed":
        meet("tier up")  # the node tier is up from here: rank 3 meets rank 2 on their node's store
        if sd.rank() == 2:
            (tmp / "killed-at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        elif sd.rank() == 3:
            try:
                with sd.main_first(local=True, name="node data", timeout=None):
                    pass
            except sd.SyncError as exc:
                took = time.time() - float((tmp / "killed-at").read_text())
                say(f"{type(exc).__name__} within {took:.1f}s: {exc}")
            (tmp / "rank3-heard").write_text("")
        else:
            _wait_for(tmp / "rank3-heard")  # rank 0 hosts the job's store: it stays till then
    elif scenario == "store_host_killed_with_tiers":
        meet("tier up")
        if sd.rank() == 0:  # once every rank has read that verdict from its store
            for r in (1, 2, 3):
                _wait_for(tmp / f"rank{r}-up")
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / f"rank{sd.rank()}-up").write_text("")
        if sd.rank() in (2, 3):
            try:
                sd.barrier("after", timeout=None)
            except sd.SyncError as exc:
                say(f"{type(exc).__name__}: {exc}")
            (tmp / f"rank{sd.rank()}-heard").write_text("")
        # Every survivor stays until both have heard: a rank 2 that goes on
        # (it caught the error) must not leave rank 3 waiting for it.
        _wait_for(tmp / "rank2-heard")
        _wait_for(tmp / "rank3-heard")
    elif scenario == "stuck_then_main_ends_first":
        meet("tier up")
        from syncdeco._plane import group

        tier = session.exchange.tier if (session := group.current()) is not None else None
        if sd.rank() == 3:
            load_batch(tmp)
        else:
            try:
                sd.barrier("end of epoch", timeout=3)
            except sd.SyncTimeoutError as exc:
                located = "in load_batch" in exc.stacks.get(3, "")
                say(
                    f"tier {tier is not None}; missing {list(exc.missing)}; rank 3 "
                    f"{exc.places.get(3)}; its stack shows load_batch: {located}"
                )
            finally:
                (tmp / f"rank{sd.rank()}-gave-up").write_text("")
        if _rank_0_ends_first(tmp):
            say("exiting after rank 0")
    elif scenario in ("main_ends_first", "store_host_gone"):
        meet("local start", local=True)  # both scopes in use
        if not _rank_0_ends_first(tmp):
            return
        if scenario == "store_host_gone":
            try:
                meet("next")
            except sd.SyncError as exc:
                say(f"{type(exc).__name__}: {exc}")
        else:
            say("exiting after rank 0")


def load_batch(tmp: Path) -> None:
    """A user function rank 3 is busy in (a slow filesystem, a data loader)
    until the others have given up on it, with a deadline of its own.  No
    helper of this file in the loop: the innermost frame of user code must
    be this function whenever its stack is taken."""
    deadline = time.monotonic() + 60
    while not all((tmp / f"rank{r}-gave-up").exists() for r in (0, 1, 2)):
        if time.monotonic() > deadline:
            raise TimeoutError("ranks 0, 1 and 2 never gave up on rank 3")
        time.sleep(0.002)


def _rank_0_ends_first(tmp: Path) -> bool:
    """Rank 0 returns at once (False); the others wait until its process
    (and the store it hosts) has ended, then return True."""
    if sd.rank() == 0:
        (tmp / "rank0.pid.tmp").write_text(str(os.getpid()))
        os.replace(tmp / "rank0.pid.tmp", tmp / "rank0.pid")
        return False
    pid = int(_wait_for(tmp / "rank0.pid"))
    # rank 0 and its store are gone before this rank goes on
    _until(f"rank 0 (pid {pid}) to exit", lambda: not _alive(pid))
    return True


def _until(what: str, done: Callable[[], bool], within: float = 60.0) -> None:
    """Poll ``done`` with a deadline of its own, well inside the test's 120 s,
    so that a scenario that goes wrong fails here, saying what it waited for."""
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {sd.rank()} waited {within:g}s for {what}")
        time.sleep(0.002)


def _wait_for(path: Path) -> str:
    _until(f"{path.name} in {path.parent}, which another rank writes", path.exists)
    return path.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except OSError:  # gone, or going while it was read
        return False


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
