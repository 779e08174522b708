"""``Queues``: how frames and verdicts travelled in syncdeco before 0.2.

A queue per member and direction over the store: the main pops each
member's frame in turn and pushes one verdict per member.  No longer
product code (syncdeco uses ``syncdeco._plane.transport.Keys``); kept here
so that ``scale.py`` can measure the two designs side by side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from syncdeco._plane.deadline import Deadline
from syncdeco._plane.transport import Late, wait_on

__all__ = ["Queues"]


class Queues:
    """A queue per member and direction (syncdeco before 0.2)."""

    __slots__ = ("store",)

    def __init__(self, store: Any) -> None:
        self.store = store

    def _pop(self, box: str, seq: int, deadline: Deadline) -> bytes:
        """The next frame of this sync point in ``box``: older ones were
        left by a sync point that timed out."""
        empty_pops = 0
        while True:
            if deadline.passed() and not self.store.queue_len(box):
                raise Late
            try:
                data = bytes(
                    wait_on(self.store, deadline, lambda: self.store.queue_pop(box, block=True))
                )
            except dist.QueueEmptyError:
                # The store's wait on a queue can return while the queue is
                # empty (a race in the store server): back off, wait again.
                empty_pops += 1
                time.sleep(min(1e-5 * 2**empty_pops, 1e-3))
                continue
            if int.from_bytes(data[:8], "little") >= seq:
                return data[8:]

    def send(self, base: str, seq: int, rank: int, frame: bytes) -> None:
        self.store.queue_push(f"{base}/{rank}/up", seq.to_bytes(8, "little") + frame)

    def collect(
        self, base: str, seq: int, members: Sequence[int], deadline: Deadline
    ) -> tuple[dict[int, bytes], list[int]]:
        frames: dict[int, bytes] = {}
        missing: list[int] = []
        for member in members:
            try:
                # Once out of time, take only what is there.
                frames[member] = self._pop(
                    f"{base}/{member}/up",
                    seq,
                    Deadline(time.monotonic(), None) if missing else deadline,
                )
            except Late:
                missing.append(member)
        return frames, missing

    def arrived(self, base: str, seq: int, members: Sequence[int]) -> list[int]:
        return [m for m in members if self.store.queue_len(f"{base}/{m}/up")]

    def answer(self, base: str, seq: int, members: Sequence[int], verdict: bytes) -> None:
        for member in members:
            self.offer_verdict(base, seq, member, verdict)

    def receive(self, base: str, seq: int, rank: int, deadline: Deadline) -> bytes:
        return self._pop(f"{base}/{rank}/down", seq, deadline)

    def has_verdict(self, base: str, seq: int, rank: int) -> bool:
        return bool(self.store.queue_len(f"{base}/{rank}/down"))

    def peek(self, base: str, seq: int, rank: int) -> bytes | None:
        return None  # a queue is read by popping it: only its member does

    def drop_frame(self, base: str, seq: int, rank: int) -> None:
        pass  # popping took it

    def drop_verdict(self, base: str, seq: int) -> None:
        pass

    def post(
        self,
        frames: Sequence[tuple[str, int, int, bytes]],
        verdicts: Sequence[tuple[str, int, bytes]],
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        for key, value in extra:
            self.store.set(key, value)
        for base, seq, rank, frame in frames:
            self.send(base, seq, rank, frame)
        for base, seq, verdict in verdicts:
            self.store.queue_push(f"{base}/-1/down", seq.to_bytes(8, "little") + verdict)

    def offer_frame(self, base: str, seq: int, rank: int, frame: bytes) -> bool:
        self.send(base, seq, rank, frame)
        return True

    def offer_verdict(self, base: str, seq: int, rank: int, verdict: bytes) -> None:
        self.store.queue_push(f"{base}/{rank}/down", seq.to_bytes(8, "little") + verdict)
