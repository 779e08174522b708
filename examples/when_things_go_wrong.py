"""What each rank sees when something goes wrong.

    torchrun --nproc-per-node 2 examples/when_things_go_wrong.py

Five faults in a row on one process group: the main rank raises inside
main_first, rank 1 is late to a barrier, the ranks reach different sync
points, an asyncio timeout cancels the main rank's task inside an async
main_first (while rank 1's event loop keeps running as it waits), and rank
1's program ends while rank 0 goes on to one more sync point.  Each rank
prints the error it got; the group keeps working.
"""

from __future__ import annotations

import asyncio
import time

import syncdeco as sd


def say(line: str) -> None:
    # one write per line, so that two ranks' lines never run together
    print(f"[rank {sd.rank()}] {line}\n\n", end="", flush=True)


def show(err: BaseException) -> None:
    say(f"{type(err).__name__}: {err}")


@sd.main_first
def download_dataset() -> None:
    if sd.is_main():
        raise ConnectionError("HTTP 503 from the dataset mirror")


@sd.barrier_after
def save_checkpoint() -> None:
    pass  # pretend: write it


@sd.barrier_after
def load_checkpoint() -> None:
    pass  # pretend: read it


@sd.main_first
async def fetch_index() -> None:
    if sd.is_main():
        await asyncio.sleep(30)  # pretend: a mirror that never answers


async def fetch_with_a_deadline() -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beating = asyncio.create_task(heartbeat())
    try:
        # the main rank's deadline: it cancels its task after 1 s
        async with asyncio.timeout(1 if sd.is_main() else None):
            await fetch_index()
    except TimeoutError:
        # asyncio's own TimeoutError has no message: say what it means here
        say(
            "TimeoutError: asyncio.timeout(1) cancelled fetch_index inside its "
            "main_first; syncdeco told the other ranks"
        )
    except sd.PeerFailedError as err:
        show(err)
    finally:
        beating.cancel()
    if sd.rank() == 1:
        say(f"its heartbeat task ticked {ticks} times while it waited")


def read_shard() -> None:
    time.sleep(3)  # pretend: a slow disk


def main() -> None:
    # 1. The main rank fails inside main_first.
    try:
        download_dataset()
    except Exception as err:
        show(err)

    # 2. Rank 1 is late; the timeout names it, where it was last seen, and
    #    the function it is in now.
    if sd.rank() == 1:
        read_shard()
    try:
        sd.barrier("end of epoch", timeout=1)
    except sd.SyncTimeoutError as err:
        show(err)

    # 3. A rank-dependent branch: the ranks reach different sync points.
    try:
        if sd.rank() == 0:
            save_checkpoint()
        else:
            load_checkpoint()
    except sd.SyncMismatchError as err:
        show(err)

    sd.barrier("still fine")
    if sd.rank() == 0:
        say("the group still works")

    # 4. A deadline cancels the main rank's task inside an async main_first:
    #    the others hear of it at once, and their event loops never stopped.
    asyncio.run(fetch_with_a_deadline())

    # 5. Rank 1's program ends; rank 0 goes on to a sync point it never reaches.
    if sd.rank() == 1:
        return
    try:
        sd.barrier("final report")
    except sd.RankExitedError as err:
        show(err)


if __name__ == "__main__":
    main()
