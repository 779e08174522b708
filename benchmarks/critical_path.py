"""Where the time of a 2-rank sync point goes, on each rank's critical path.

    python benchmarks/critical_path.py              # 3 runs of 3000 calls
    python benchmarks/critical_path.py --runs 1 --calls 200

Each run starts 2 Gloo ranks with torchrun on this machine; both call an
``on_main_only(broadcast=True)`` function with a small result in a loop.
The job's transport (``Keys``) is wrapped to take a timestamp as each
frame is sent and each verdict arrives (member), and as the frames arrive
and the verdict is sent (main).  Per call, medians in microseconds:

* member, Python: from its verdict in hand to its next frame sent
  (syncdeco's work after one sync point, the loop's, and syncdeco's before
  the next).  The main waits for that frame all the while.
* main, Python: from every frame in hand to its verdict sent.  The member
  waits for that verdict all the while.
* the rest of a call: the store's requests and the wake-ups between them.

Both Python figures are wall time: on 2 cores shared by the two ranks
and the store's server (torchrun's agent), it includes waiting for a core,
which is why each rank's CPU time per call (whole call, all threads) is
printed beside them, with, in brackets, the CPU per call of the same
sync point's store requests alone (members ``set``, rank 0 ``multi_get`` and
``set``, members ``get``, and the two deletes), timed in the same job.
``benchmarks/hotpath.py`` measures syncdeco's Python with no store and no
waiting, in a hot loop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

SMALL = {"vocab": ["<pad>", "<unk>", "hello", "world"] * 20, "size": 80}


def store_floor(store: Any, rank: int) -> Callable[[], None]:
    """The same sync point's store requests alone, with its cleanup
    (``benchmarks/_worker.py``'s "store floor + cleanup"), for its CPU."""
    from _worker import floor_step

    calls = itertools.count()
    store.set_timeout(timedelta(seconds=600))
    return lambda: floor_step(store, rank, 2, "critical", next(calls), cleanup=True)


def rank_side(calls: int, out: str) -> None:
    """One rank of the job: the loop, with the transport's calls timed."""
    from syncdeco._plane import transport

    stamps: dict[str, list[int]] = {"sent": [], "heard": [], "collected": [], "answered": []}
    now = time.perf_counter_ns
    keys = transport.Keys
    send, receive, collect, answer = keys.send, keys.receive, keys.collect, keys.answer

    def timed_send(self: transport.Keys, *args: object) -> None:
        stamps["sent"].append(now())
        send(self, *args)  # type: ignore[arg-type]

    def timed_receive(self: transport.Keys, *args: object) -> bytes:
        verdict = receive(self, *args)  # type: ignore[arg-type]
        stamps["heard"].append(now())
        return verdict

    def timed_collect(self: transport.Keys, *args: object) -> object:
        frames = collect(self, *args)  # type: ignore[arg-type]
        stamps["collected"].append(now())
        return frames

    def timed_answer(self: transport.Keys, *args: object) -> None:
        stamps["answered"].append(now())
        answer(self, *args)  # type: ignore[arg-type]

    keys.send, keys.receive = timed_send, timed_receive  # type: ignore[method-assign]
    keys.collect, keys.answer = timed_collect, timed_answer  # type: ignore[method-assign]

    import syncdeco as sd

    sd.init(backend="gloo")

    @sd.on_main_only(broadcast=True)
    def small() -> object:
        return SMALL

    import torch.distributed as dist

    floor = store_floor(dist.distributed_c10d._get_default_store().clone(), sd.rank())
    for _ in range(300):
        small()
        floor()
    sd.barrier("floor")
    cpu = time.process_time()
    for _ in range(calls):
        floor()
    floor_cpu = time.process_time() - cpu
    sd.barrier("start")
    for got in stamps.values():
        got.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        small()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if sd.rank() == 0:
        frames, verdicts = stamps["collected"], stamps["answered"]
        python = [v - f for f, v in zip(frames, verdicts, strict=True)]
    else:
        heard, sent = stamps["heard"], stamps["sent"]
        python = [s - h for h, s in zip(heard, sent[1:], strict=False)]
    result = {
        "rank": sd.rank(),
        "call": wall / calls * 1e6,
        "cpu": cpu / calls * 1e6,
        "floor_cpu": floor_cpu / calls * 1e6,
        "python": statistics.median(python) / 1000,
    }
    with open(os.path.join(out, f"rank{sd.rank()}.json"), "w") as f:
        json.dump(result, f)


def one_run(calls: int) -> dict[int, dict[str, float]]:
    from _job import two_ranks

    return dict(enumerate(two_ranks(__file__, "CRITICAL_PATH", str(calls), 600)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    print("| run | µs per call | member Python µs | main Python µs | rest µs "
          "| member CPU µs per call (floor) | main CPU µs per call (floor) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for run in range(1, args.runs + 1):
        got = one_run(args.calls)
        main_rank, member = got[0], got[1]
        call = (main_rank["call"] + member["call"]) / 2
        rest = call - member["python"] - main_rank["python"]
        print(f"| {run} | {call:.0f} | {member['python']:.0f} | {main_rank['python']:.0f} "
              f"| {rest:.0f} | {member['cpu']:.0f} ({member['floor_cpu']:.0f}) "
              f"| {main_rank['cpu']:.0f} ({main_rank['floor_cpu']:.0f}) |")  # fmt: skip


if __name__ == "__main__":
    if "CRITICAL_PATH" in os.environ:
        calls, out = os.environ["CRITICAL_PATH"].split(" ", 1)
        rank_side(int(calls), out)
    else:
        main()
