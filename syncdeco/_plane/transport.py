"""How frames and verdicts travel over a c10d store.

Two transports, both over a store and nothing else:

* :class:`Keys` (the one syncdeco uses): each member ``set``\\ s its frame
  under a key of its own for this sync point; the main waits for all of
  them and reads them in one ``multi_get`` (which waits for its keys
  first, with the connection's timeout set to the deadline); it answers
  with one verdict key that every member reads with ``get`` (the same).
  The main makes a constant number of requests however many members there
  are, and nothing is popped one at a time.
* :class:`Queues` (syncdeco before 0.2): a queue per member and direction;
  the main pops each member's frame in turn and pushes one verdict per
  member.  Kept so that ``benchmarks/scale.py`` can measure the two side
  by side.

A transport never decides anything: ``exchange.py`` does, with
``protocol.py``.  Waits end at a deadline (``time.monotonic()``; None:
never) by raising :class:`Late`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final, Protocol

import torch.distributed as dist

from .._errors import SyncError

__all__ = ["Keys", "Late", "Queues", "StoreLost", "Transport"]

FOREVER_CHUNK: Final = 3600.0  # one store wait, when a sync point waits forever
MIN_WAIT: Final = 0.001


class Late(Exception):
    """A store wait ran out of time (internal)."""


class StoreLost(SyncError):
    """The store went away while this rank waited on it."""


class Transport(Protocol):
    def send(self, base: str, seq: int, rank: int, frame: bytes) -> None:
        """A member's frame, for its main."""

    def collect(
        self, base: str, seq: int, members: Sequence[int], deadline: float | None
    ) -> tuple[dict[int, bytes], list[int]]:
        """The main: every member's frame, waiting until ``deadline``;
        returns (frames by member, members whose frame did not come)."""

    def arrived(self, base: str, seq: int, members: Sequence[int]) -> list[int]:
        """The members whose frame is there (a request per member: for
        reports, not for the sync itself)."""

    def answer(self, base: str, seq: int, members: Sequence[int], verdict: bytes) -> None:
        """The main: the verdict, for every member."""

    def receive(self, base: str, seq: int, rank: int, deadline: float | None) -> bytes:
        """A member: its verdict; raises Late at ``deadline``."""

    def has_verdict(self, base: str, seq: int, rank: int) -> bool: ...

    def drop_frame(self, base: str, seq: int, rank: int) -> None:
        """A member, after its verdict: forget its frame."""

    def drop_verdict(self, base: str, seq: int) -> None:
        """The main, once every member sent its frame for ``seq + 1`` (so
        each has read this verdict): forget it."""

    def post(
        self,
        frames: Sequence[tuple[str, int, int, bytes]],
        verdicts: Sequence[tuple[str, int, bytes]],
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Send ``frames`` (base, seq, rank, frame), ``verdicts`` (base, seq,
        verdict) and ``extra`` (key, value) in one request where the store
        allows: at exit, to a store that may be gone, one send fails quietly
        where several would make its client log a broken pipe."""

    def offer_frame(self, base: str, seq: int, rank: int, frame: bytes) -> bool:
        """Like send, on behalf of a rank that is gone; never replaces a
        frame it sent itself.  Returns whether ``frame`` is there now."""

    def offer_verdict(self, base: str, seq: int, rank: int, verdict: bytes) -> None:
        """A verdict for member ``rank`` (Keys: for every member) unless
        one is there already."""


def _timeout(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, MIN_WAIT))


def _left(deadline: float | None) -> float:
    return FOREVER_CHUNK if deadline is None else deadline - time.monotonic()


def _timed_out(exc: dist.DistStoreError, deadline: float | None) -> bool:
    """Whether a store error is a wait that ran out (True: past ``deadline``;
    False: wait again); anything else means the store is gone."""
    if "timeout" not in str(exc).lower():
        raise StoreLost(
            f"syncdeco lost the process group's store while waiting: {exc}. "
            f"Rank 0 or the launcher may have exited."
        ) from exc
    return deadline is not None and time.monotonic() >= deadline


class Keys:
    """Frames and verdicts under keys of their own, one set per sync point."""

    __slots__ = ("store",)

    def __init__(self, store: Any) -> None:  # a c10d Store
        self.store = store

    def send(self, base: str, seq: int, rank: int, frame: bytes) -> None:
        self.store.set(f"{base}/u/{seq}/{rank}", frame)

    def collect(
        self, base: str, seq: int, members: Sequence[int], deadline: float | None
    ) -> tuple[dict[int, bytes], list[int]]:
        keys = [f"{base}/u/{seq}/{m}" for m in members]
        while True:
            try:
                # multi_get waits for its keys itself, with the connection's
                # timeout: one wait less than wait() and then multi_get().
                self.store.set_timeout(_timeout(_left(deadline)))
                return dict(zip(members, self.store.multi_get(keys), strict=True)), []
            except dist.DistStoreError as exc:
                if _timed_out(exc, deadline):
                    break
        # Out of time (a rare path): take what is there.
        here = self.arrived(base, seq, members)
        frames = self.store.multi_get([f"{base}/u/{seq}/{m}" for m in here]) if here else []
        return dict(zip(here, frames, strict=True)), [m for m in members if m not in here]

    def arrived(self, base: str, seq: int, members: Sequence[int]) -> list[int]:
        return [m for m in members if self.store.check([f"{base}/u/{seq}/{m}"])]

    def answer(self, base: str, seq: int, members: Sequence[int], verdict: bytes) -> None:
        self.store.set(f"{base}/d/{seq}", verdict)

    def receive(self, base: str, seq: int, rank: int, deadline: float | None) -> bytes:
        key = f"{base}/d/{seq}"
        while True:
            left = _left(deadline)
            if left <= 0 and not self.store.check([key]):
                raise Late
            try:
                self.store.set_timeout(_timeout(left))  # get waits for its key itself
                return bytes(self.store.get(key))
            except dist.DistStoreError as exc:
                if _timed_out(exc, deadline):
                    raise Late from None

    def has_verdict(self, base: str, seq: int, rank: int) -> bool:
        return bool(self.store.check([f"{base}/d/{seq}"]))

    def drop_frame(self, base: str, seq: int, rank: int) -> None:
        self.store.delete_key(f"{base}/u/{seq}/{rank}")

    def drop_verdict(self, base: str, seq: int) -> None:
        self.store.delete_key(f"{base}/d/{seq}")

    def post(
        self,
        frames: Sequence[tuple[str, int, int, bytes]],
        verdicts: Sequence[tuple[str, int, bytes]],
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        keys = [f"{base}/u/{seq}/{rank}" for base, seq, rank, _ in frames]
        keys += [f"{base}/d/{seq}" for base, seq, _ in verdicts]
        keys += [key for key, _ in extra]
        values = [f[3] for f in frames] + [v[2] for v in verdicts] + [v for _, v in extra]
        self.store.multi_set(keys, values)

    def offer_frame(self, base: str, seq: int, rank: int, frame: bytes) -> bool:
        return bytes(self.store.compare_set(f"{base}/u/{seq}/{rank}", "", frame)) == frame

    def offer_verdict(self, base: str, seq: int, rank: int, verdict: bytes) -> None:
        self.store.compare_set(f"{base}/d/{seq}", "", verdict)


class Queues:
    """A queue per member and direction (syncdeco before 0.2)."""

    __slots__ = ("store",)

    def __init__(self, store: Any) -> None:
        self.store = store

    def _pop(self, box: str, seq: int, deadline: float | None) -> bytes:
        """The next frame of this sync point in ``box``: older ones were
        left by a sync point that timed out."""
        empty_pops = 0
        while True:
            left = _left(deadline)
            if left <= 0 and not self.store.queue_len(box):
                raise Late
            try:
                self.store.set_timeout(_timeout(left))
                data = bytes(self.store.queue_pop(box, block=True))
            except dist.QueueEmptyError:
                # The store's wait on a queue can return while the queue is
                # empty (a race in the store server): back off, wait again.
                empty_pops += 1
                time.sleep(min(1e-5 * 2**empty_pops, 1e-3))
                continue
            except dist.DistStoreError as exc:
                if _timed_out(exc, deadline):
                    raise Late from None
                continue
            if int.from_bytes(data[:8], "little") >= seq:
                return data[8:]

    def send(self, base: str, seq: int, rank: int, frame: bytes) -> None:
        self.store.queue_push(f"{base}/{rank}/up", seq.to_bytes(8, "little") + frame)

    def collect(
        self, base: str, seq: int, members: Sequence[int], deadline: float | None
    ) -> tuple[dict[int, bytes], list[int]]:
        frames: dict[int, bytes] = {}
        missing: list[int] = []
        for member in members:
            try:
                # Once out of time, take only what is there.
                frames[member] = self._pop(
                    f"{base}/{member}/up", seq, time.monotonic() if missing else deadline
                )
            except Late:
                missing.append(member)
        return frames, missing

    def arrived(self, base: str, seq: int, members: Sequence[int]) -> list[int]:
        return [m for m in members if self.store.queue_len(f"{base}/{m}/up")]

    def answer(self, base: str, seq: int, members: Sequence[int], verdict: bytes) -> None:
        for member in members:
            self.offer_verdict(base, seq, member, verdict)

    def receive(self, base: str, seq: int, rank: int, deadline: float | None) -> bytes:
        return self._pop(f"{base}/{rank}/down", seq, deadline)

    def has_verdict(self, base: str, seq: int, rank: int) -> bool:
        return bool(self.store.queue_len(f"{base}/{rank}/down"))

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
