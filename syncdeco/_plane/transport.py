"""How frames and verdicts travel over a c10d store.

:class:`Keys`, over a store and nothing else: each member ``set``\\ s its
frame under a key of its own for this sync point; the main waits for all of
them and reads them in one ``multi_get`` (which waits for its keys first,
with the connection's timeout set to the deadline); it answers with one
verdict key that every member reads with ``get`` (the same).  The main
makes a constant number of requests however many members there are, and
nothing is popped one at a time.  (The queue per member of syncdeco before
0.2 lives on in ``benchmarks/_queues.py``, which ``benchmarks/scale.py``
measures against this.)

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

__all__ = ["Keys", "Late", "StoreLost", "Transport"]

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
