"""Async sync points: a rank that waits keeps its event loop running.

The ticks tests order everything with files and syncdeco's own sync points:
the waiting rank starts a ticker task right before it awaits the sync point,
and the other rank's body cannot finish until that ticker has written a file
after ``TICKS`` ticks.  A sync point that blocked the loop would never let
the ticker tick, and the test would fail at its deadline.  Ticks happen
after the waiting rank has reached the sync point: a coroutine runs without
yielding to the loop up to the first thing it awaits, which is the wait.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import syncdeco as sd
from syncdeco._backend import Failure, SyncPoint
from syncdeco.testing import run_ranks

TICKS = 5
DEADLINE = 60.0  # seconds any wait loop here may take


async def _until(path: Path) -> None:
    """Wait (without blocking the loop) until ``path`` exists."""
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {sd.rank()}: {path.name} did not appear")
        await asyncio.sleep(0.002)


class _Ticker:
    """A task of the waiting rank: ticks, and writes ``flag`` after TICKS."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag
        self.ticks = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            if self.ticks == TICKS:
                self.flag.write_text(str(sd.rank()))
            await asyncio.sleep(0.001)

    async def stop(self) -> int:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        return self.ticks


# -- the loop keeps running while a rank waits -----------------------------------


def waits_without_blocking(tmp: Path, case: str, waiter: int) -> dict[str, Any]:
    """``waiter`` waits at the sync point of ``case``; the other rank's body
    finishes only once ``waiter``'s ticker has ticked TICKS times."""
    flag = tmp / "ticked"
    me = sd.rank()

    async def hold_until_ticked() -> None:
        if me != waiter:
            await _until(flag)

    @sd.main_first
    async def load() -> str:
        await hold_until_ticked()
        return f"loaded on {me}"

    @sd.barrier_after
    async def step() -> str:
        await hold_until_ticked()
        return f"stepped on {me}"

    @sd.on_main_only(broadcast=True)
    async def vocab() -> str:
        await hold_until_ticked()
        return f"vocab of {me}"

    async def with_main_first() -> str:
        async with sd.main_first():
            await hold_until_ticked()
        return f"loaded on {me}"

    async def with_barrier_after() -> str:
        async with sd.barrier_after():
            await hold_until_ticked()
        return f"stepped on {me}"

    calls: dict[str, Callable[[], Awaitable[str]]] = {
        "main_first": load,
        "barrier_after": step,
        "broadcast": vocab,
        "async with main_first": with_main_first,
        "async with barrier_after": with_barrier_after,
    }

    async def main() -> dict[str, Any]:
        ticker = _Ticker(flag) if me == waiter else None
        result = await calls[case]()
        ticks = await ticker.stop() if ticker is not None else None
        return {"result": result, "ticks": ticks, "thread": threading.current_thread().name}

    return asyncio.run(main())


@pytest.mark.parametrize(
    "case, waiter, results",
    [
        # the members wait while the main runs the body
        ("main_first", 1, ["loaded on 0", "loaded on 1"]),
        ("async with main_first", 1, ["loaded on 0", "loaded on 1"]),
        # the main is done first and waits for the member
        ("barrier_after", 0, ["stepped on 0", "stepped on 1"]),
        ("async with barrier_after", 0, ["stepped on 0", "stepped on 1"]),
        # the member waits for the main's result
        ("broadcast", 1, ["vocab of 0", "vocab of 0"]),
    ],
)
def test_other_tasks_run_while_a_rank_waits(
    tmp_path: Path, case: str, waiter: int, results: list[str]
) -> None:
    outcomes = [o.unwrap() for o in run_ranks(waits_without_blocking, 2, tmp_path, case, waiter)]
    assert [o["result"] for o in outcomes] == results
    # the waiting rank's ticker ran TICKS times while it waited (the other
    # rank's body could not end before), and the other rank had no ticker
    assert outcomes[waiter]["ticks"] >= TICKS
    assert outcomes[1 - waiter]["ticks"] is None
    assert all(o["thread"] == "MainThread" for o in outcomes)


# -- cancellation ---------------------------------------------------------------------


async def _cancelled_while_waiting(call: Callable[[], Awaitable[str]]) -> str:
    """Run ``call()`` in a task, cancel it once it waits at its sync point,
    and return what the task ended with."""
    reached = asyncio.Event()

    async def wait() -> str:
        reached.set()
        return await call()  # runs up to the wait without yielding

    task = asyncio.create_task(wait())
    await reached.wait()  # resumes once the task awaits the sync point
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "CancelledError"


def cancelled_while_waiting(tmp: Path, case: str, waiter: int) -> dict[str, Any]:
    """``waiter``'s task is cancelled while it waits at the sync point; the
    other rank's body ends once it has been (a file says so).  Then both
    meet at the next sync point, which shows they are still in step."""
    cancelled = tmp / "cancelled"
    me = sd.rank()

    async def body() -> str:
        if me != waiter:
            await _until(cancelled)
        (tmp / f"ran{me}").write_text("")
        return f"{case} on {me}"

    deco = {
        "main_first": sd.main_first,
        "barrier_after": sd.barrier_after,
        "broadcast": sd.on_main_only(broadcast=True),
    }[case]
    call = deco(body)

    @sd.barrier_after(name="after")
    async def after() -> int:
        return me

    async def main() -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        if me == waiter:
            outcome["result"] = await _cancelled_while_waiting(call)
            cancelled.write_text("")
        else:
            outcome["result"] = await call()
        outcome["after"] = await after()
        outcome["ran body"] = (tmp / f"ran{me}").exists()
        return outcome

    return asyncio.run(main())


@pytest.mark.parametrize(
    "case, waiter",
    [("main_first", 1), ("barrier_after", 0), ("broadcast", 1)],
)
def test_a_task_cancelled_at_a_sync_point_leaves_the_ranks_in_step(
    tmp_path: Path, case: str, waiter: int
) -> None:
    outcomes = [o.unwrap() for o in run_ranks(cancelled_while_waiting, 2, tmp_path, case, waiter)]
    other = 1 - waiter
    # the cancelled task gets CancelledError at once; its rank's part of the
    # exchange completes in the background, so the other rank completes too
    assert outcomes[waiter]["result"] == "CancelledError"
    expected = "broadcast on 0" if case == "broadcast" else f"{case} on {other}"
    assert outcomes[other]["result"] == expected
    assert [o["after"] for o in outcomes] == [0, 1]  # the next sync point pairs up
    # a member cancelled before its turn never runs the body; a rank
    # cancelled after its body (barrier_after) has run it
    assert outcomes[waiter]["ran body"] is (case == "barrier_after")
    assert outcomes[other]["ran body"]


def blocking_after_cancelled(tmp: Path) -> dict[str, Any]:
    """Rank 0 reaches two async sync points, A and B, whose tasks are
    cancelled while they wait (A waits for rank 1, B is queued behind it),
    then the blocking sync point C in its own thread. Rank 1 reaches A, B
    and C in order, once a file says rank 0 is about to reach C."""
    me, reaching_c = sd.rank(), tmp / "reaching-c"

    @sd.barrier_after(name="A")
    async def a() -> str:
        return "A"

    @sd.barrier_after(name="B")
    async def b() -> str:
        return "B"

    async def main() -> dict[str, Any]:
        if me == 0:
            got = {"A": await _cancelled_while_waiting(a), "B": await _cancelled_while_waiting(b)}
        else:
            await _until(reaching_c)
            got = {"A": await a(), "B": await b()}
        return got

    outcome = asyncio.run(main())
    if me == 0:
        reaching_c.write_text("")
    try:
        sd.barrier("C")
        outcome["C"] = "C"
    except sd.SyncError as exc:
        outcome["C"] = type(exc).__name__
    return outcome


def test_a_blocking_sync_point_waits_for_the_async_ones_reached_before_it(
    tmp_path: Path,
) -> None:
    """A sync point reached in the program's own thread comes after the
    async sync points this rank reached earlier, even those whose tasks
    were cancelled and still wait in the background (otherwise it would
    take their place and meet the other ranks' earlier sync point)."""
    outcomes = [o.unwrap() for o in run_ranks(blocking_after_cancelled, 2, tmp_path)]
    assert outcomes[0] == {"A": "CancelledError", "B": "CancelledError", "C": "C"}
    assert outcomes[1] == {"A": "A", "B": "B", "C": "C"}


def cancelled_in_body(tmp: Path, case: str, raiser: int, early: bool) -> dict[str, Any]:
    """``raiser``'s task is cancelled before its sync point: inside the body,
    or (``early``) as soon as the task first yields, which on a main rank
    may be before its body starts (joining the group, the first time)."""
    me = sd.rank()

    async def body() -> str:
        if me == raiser:
            started.set()
            await asyncio.Event().wait()  # until cancelled
        return f"{case} on {me}"

    deco = {
        "main_first": sd.main_first,
        "barrier_after": sd.barrier_after,
        "broadcast": sd.on_main_only(broadcast=True),
    }[case]
    call = deco(body)

    @sd.barrier_after(name="after")
    async def after() -> int:
        return me

    async def main() -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        task = asyncio.create_task(call())
        if me == raiser:
            if early:
                await asyncio.sleep(0)  # the task runs up to its first wait
            else:
                await started.wait()
            task.cancel()
        try:
            outcome["result"] = await task
        except asyncio.CancelledError:
            outcome["result"] = "CancelledError"
        except sd.PeerFailedError as error:
            outcome["result"] = "PeerFailedError"
            outcome["error"] = (error.rank, error.exc_type, error.point, str(error))
        outcome["after"] = await after()
        return outcome

    started = asyncio.Event()
    return asyncio.run(main())


@pytest.mark.parametrize(
    "case, raiser, early",
    [
        ("main_first", 0, False),
        ("main_first", 0, True),
        ("broadcast", 0, True),
        ("barrier_after", 1, False),
    ],
)
def test_a_task_cancelled_before_its_sync_point_fails_the_others(
    tmp_path: Path, case: str, raiser: int, early: bool
) -> None:
    outcomes = [o.unwrap() for o in run_ranks(cancelled_in_body, 2, tmp_path, case, raiser, early)]
    other = 1 - raiser
    assert outcomes[raiser]["result"] == "CancelledError"
    assert outcomes[other]["result"] == "PeerFailedError"
    rank, exc_type, point, message = outcomes[other]["error"]
    assert (rank, exc_type) == (raiser, "CancelledError")
    kind = "on_main_only" if case == "broadcast" else case
    assert point.startswith(f"{kind} '") and "cancelled_in_body.<locals>.body" in point
    assert f"rank {raiser} raised CancelledError: the task running it was cancelled" in message
    assert [o["after"] for o in outcomes] == [0, 1]  # still in step


# -- one process: where async sync points run -----------------------------------------


class _Recording:
    """A one-rank user backend that records each sync point and its thread."""

    def __init__(self) -> None:
        self.seen: list[tuple[SyncPoint, str]] = []

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def local_rank(self) -> int:
        return 0

    def sync(
        self,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        self.seen.append((point, threading.current_thread().name))
        return payload


def test_async_with_names_its_line_and_waits_in_the_worker() -> None:
    rec = _Recording()

    async def main() -> None:
        async with sd.barrier_after():  # the sync point's name: this line
            pass
        async with sd.main_first(name="load"):
            pass

    with sd.use_backend(rec):
        asyncio.run(main())
    (point, thread), (named, _) = rec.seen
    assert (point.kind, named.kind, named.name) == ("barrier_after", "main_first", "load")
    line = point.location.split(":")[1]
    assert point.location == f"test_async.py:{line}" and point.name == point.location
    source = Path(__file__).read_text().splitlines()[int(line) - 1]
    assert "async with sd.barrier_after()" in source
    assert thread == "syncdeco-async"


def test_async_with_on_the_null_backend_and_its_errors() -> None:
    async def main() -> list[str]:
        done = []
        async with sd.main_first():
            done.append("main_first")
        async with sd.barrier_after(every=2):
            done.append("barrier_after")
        with pytest.raises(KeyError):
            async with sd.main_first():
                raise KeyError("the block's own error goes on")
        return done

    assert asyncio.run(main()) == ["main_first", "barrier_after"]


def test_on_main_only_is_no_with_block() -> None:
    with pytest.raises(TypeError, match=r"on_main_only\(broadcast=True.*decorator, not a with"):
        with sd.on_main_only(broadcast=True):  # type: ignore[attr-defined]
            pass

    async def main() -> None:
        async with sd.on_main_only():  # type: ignore[attr-defined]
            pass

    with pytest.raises(TypeError, match=r"is_main\(\)"):
        asyncio.run(main())


def test_a_failing_background_wait_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A task cancelled while its sync point waits is not there to hear how the
    # sync point ended: an error is logged instead.
    gate = threading.Event()

    class Failing(_Recording):
        def sync(self, point: SyncPoint, **kwargs: Any) -> object:
            gate.wait(DEADLINE)
            raise sd.SyncTimeoutError(missing=[1], point=point.describe(), timeout=1.0, observer=0)

    backend = Failing()

    @sd.barrier_after
    async def step() -> None: ...

    async def main() -> None:
        task = asyncio.create_task(step())
        await asyncio.sleep(0)  # the task runs up to its wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        # the next sync point runs after the cancelled one, in order
        with pytest.raises(sd.SyncTimeoutError):
            await step()

    with sd.use_backend(backend), caplog.at_level("WARNING", logger="syncdeco"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if "cancelled" in r.getMessage()]
    assert "barrier_after" in record.getMessage() and "SyncTimeoutError" in record.getMessage()
