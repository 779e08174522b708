"""What an async sync point costs, against the blocking one it replaces.

    torchrun --nproc-per-node 2 benchmarks/async_cost.py [--rounds 5 --calls 200]

Inside one event loop, each case runs ``calls`` sync points that complete
at once (every rank is there), in interleaved rounds; rank 0 prints each
case's per-call median in microseconds and its ratio to the blocking call
(what a decorated coroutine cost before: its sync point blocked the loop).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import syncdeco as sd


@sd.barrier_after
def step() -> None: ...


@sd.barrier_after
async def astep() -> None: ...


@sd.main_first
def load() -> None: ...


@sd.main_first
async def aload() -> None: ...


@sd.on_main_only(broadcast=True)
def vocab() -> dict[str, int]:
    return {"a": 1, "b": 2}


@sd.on_main_only(broadcast=True)
async def avocab() -> dict[str, int]:
    return {"a": 1, "b": 2}


async def with_barrier_after() -> None:
    async with sd.barrier_after():
        pass


def blocking(call: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return call()  # the sync point blocks the loop, as async code did before

    return run


CASES: list[tuple[str, str, Callable[[], Awaitable[object]]]] = [
    ("barrier_after", "blocking", blocking(step)),
    ("barrier_after", "async def", astep),
    ("barrier_after", "async with", with_barrier_after),
    ("main_first", "blocking", blocking(load)),
    ("main_first", "async def", aload),
    ("broadcast, small", "blocking", blocking(vocab)),
    ("broadcast, small", "async def", avocab),
]


async def measure(rounds: int, calls: int) -> dict[tuple[str, str], list[float]]:
    times: dict[tuple[str, str], list[float]] = {(f, h): [] for f, h, _ in CASES}
    for _, _, call in CASES:  # warm up: join the group, start the worker
        await call()
    for _ in range(rounds):
        for figure, how, call in CASES:
            sd.barrier("round")  # every rank starts each case together
            start = time.perf_counter()
            for _ in range(calls):
                await call()
            times[(figure, how)].append((time.perf_counter() - start) / calls * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    times = asyncio.run(measure(args.rounds, args.calls))
    if sd.rank() != 0:
        return
    print(f"{sd.world_size()} ranks, {args.rounds} interleaved rounds of {args.calls} calls")
    print("| figure | how | µs per call (median) | rounds min-max | ratio to blocking |")
    print("|---|---|---|---|---|")
    for (figure, how), samples in times.items():
        median = statistics.median(samples)
        base = statistics.median(times[(figure, "blocking")])
        print(
            f"| {figure} | {how} | {median:.0f} | {min(samples):.0f}-{max(samples):.0f} "
            f"| {median / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
