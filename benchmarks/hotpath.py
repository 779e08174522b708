"""syncdeco's own Python per sync point, on each side of a 2-rank sync point.

    python benchmarks/hotpath.py            # barrier_after and a small broadcast result
    python benchmarks/hotpath.py --smoke    # a few calls, to check it runs

One process plays one rank at a time: the decorated call goes through the
policies, a backend that hands the sync point to a real ``Exchange``, and
the exchange's whole path (route, frame, codec, verdict, result), over a
store that answers every request at once with what the other rank would
have sent.  So the figure is the Python a rank runs per sync point, with
no store, no network and no waiting: what the loaded 2-core machine's
CPU sees on top of the store's requests (``benchmarks/run.py`` measures
those as "the store's floor").  CPU time per call, the best of the
rounds (a shared machine only ever adds).
"""

from __future__ import annotations

import argparse
import functools
import time
import timeit
from typing import Any

import syncdeco as sd
from syncdeco._backend import Failure, SyncPoint
from syncdeco._plane import exchange, wire
from syncdeco._plane.frames import Frame, Ok, dump_frame, dump_verdict
from syncdeco._plane.protocol import Place

SMALL = {"vocab": ["<pad>", "<unk>", "hello", "world"] * 20, "size": 80}


class AtOnce:
    """A c10d store's requests as the exchange makes them, answered at once
    with the other rank's frame or the main's verdict."""

    frame = verdict = b""

    def set(self, key: str, value: bytes) -> None: ...

    def delete_key(self, key: str) -> bool:
        return True

    def set_timeout(self, timeout: object) -> None: ...

    def check(self, keys: list[str]) -> bool:
        return True

    def get(self, key: str) -> bytes:
        return self.verdict

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.frame]

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return self.frame  # (the main reads its one member's frame, there already)


class OneSide:
    """A backend that plays ``rank`` of 2 through a real exchange."""

    def __init__(self, rank: int, result: bytes | None) -> None:
        self.store = AtOnce()
        self.result = result
        self.exchange = exchange.Exchange(self.store, rank, 2, Place("node", rank, 2), tiers=False)
        self.exchange.watcher = object()  # type: ignore[assignment]  # (no thread: nothing waits)
        self.exchange.wire_device = functools.partial(wire.wire_device, "gloo")  # (no group)

    def rank(self) -> int:
        return self.exchange.rank

    def world_size(self) -> int:
        return 2

    def local_rank(self) -> int:
        return self.exchange.rank

    def sync(
        self,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        seq = self.exchange.seq["w"] + 1  # what the other rank sends for this one
        self.store.frame = dump_frame(Frame.of(seq, 1, point, None, None))
        self.store.verdict = dump_verdict(Ok(seq, self.result))
        return self.exchange.sync(point, local, failure, payload, timeout)


def per_call(rank: int, case: str, number: int, repeat: int) -> float:
    """CPU µs per call of ``case`` on ``rank`` (0: the main)."""
    result = wire.dumps(SMALL, []) if case == "small" else None
    backend: Any = OneSide(rank, result)

    if case == "small":

        @sd.on_main_only(broadcast=True)
        def call() -> object:
            return SMALL
    else:

        @sd.barrier_after
        def call() -> object:
            return None

    with sd.use_backend(backend):
        call()
        best = min(timeit.repeat(call, timer=time.process_time, number=number, repeat=repeat))
    return best / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few calls, to check it runs")
    args = parser.parse_args()
    number, repeat = (10, 1) if args.smoke else (20_000, 7)
    print("| sync point | main (rank 0) µs | member (rank 1) µs |")
    print("|---|---|---|")
    for case, name in (("barrier", "barrier_after"), ("small", "on_main_only(broadcast) small")):
        main_us, member_us = (per_call(r, case, number, repeat) for r in (0, 1))
        print(f"| {name} | {main_us:.1f} | {member_us:.1f} |")
    print(
        "\n(Includes about 2 µs per call of this benchmark's own: the other rank's "
        "frame and verdict, encoded for the store that answers at once.)"
    )


if __name__ == "__main__":
    main()
