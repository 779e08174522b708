"""How frames and verdicts travel over a c10d store.

:class:`Keys`, over a store and nothing else: each member ``set``\\ s its
frame under a key of its own for this sync point; the main waits for all of
them and reads them in one ``multi_get`` (which waits for its keys first,
with the connection's timeout set to the deadline; a lone member's frame
that is there already is read with one request that does not wait); it
answers with one verdict key that every member reads with ``get`` (the
same).  The main
makes a constant number of requests however many members there are, and
nothing is popped one at a time.  (The queue per member of syncdeco's first
design lives on in ``benchmarks/_queues.py``, which ``benchmarks/scale.py``
measures against this.)

A transport never decides anything: ``exchange.py`` does, with
``protocol.py``.  Waits end at a :class:`~.deadline.Deadline` by raising
:class:`Late`; every store wait goes through :func:`wait_on`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Final, Protocol, TypeVar

import torch.distributed as dist

from .._errors import SyncError
from .deadline import Deadline

__all__ = ["Keys", "Late", "StoreLost", "Transport", "wait_on"]

T = TypeVar("T")

# A value no frame or verdict has (theirs are pickles): ``compare_set(key,
# ABSENT, ABSENT)`` answers with the key's value, or with ABSENT where the
# key is not there, and sets nothing either way: a read that does not wait.
# Only where nobody else waits for that key: torch 2.13's libuv store server
# wakes every client waiting for a key on any compare_set of it, even one
# that sets nothing, and the woken client's read of the missing key returns
# b"" (seen: a node's main waiting for rank 0's verdict got b"" when its
# watcher looked at that key this way).  A main's members' frames are read
# by that main alone, one request at a time; verdicts, which several ranks
# and watchers wait for, are looked at with check() and get() (``peek``).
ABSENT: Final = b"\x00syncdeco: no such key"
FOREVER_CHUNK: Final = 3600.0  # one store wait, when a sync point waits forever
_FOREVER: Final = timedelta(seconds=FOREVER_CHUNK)  # (made once: a wait at every sync point)
MIN_WAIT: Final = 0.001
# A wait that had less than this left restores the connection's timeout to
# _FOREVER when it ends: the requests after it that do not wait (a delete,
# a check) wait for their replies with that timeout, and a millisecond is
# too little on a busy host.
SHORT_WAIT: Final = 1.0


class Late(Exception):
    """A store wait ran out of time (internal)."""


class StoreLost(SyncError):
    """The store went away while this rank waited on it."""


class Transport(Protocol):
    def send(self, base: str, seq: int, rank: int, frame: bytes) -> None:
        """A member's frame, for its main."""

    def collect(
        self, base: str, seq: int, members: Sequence[int], deadline: Deadline
    ) -> tuple[dict[int, bytes], list[int]]:
        """The main: every member's frame, waiting until ``deadline``;
        returns (frames by member, members whose frame did not come)."""

    def arrived(self, base: str, seq: int, members: Sequence[int]) -> list[int]:
        """The members whose frame is there (a request per member: for
        reports, not for the sync itself)."""

    def answer(self, base: str, seq: int, members: Sequence[int], verdict: bytes) -> None:
        """The main: the verdict, for every member."""

    def receive(self, base: str, seq: int, rank: int, deadline: Deadline) -> bytes:
        """A member: its verdict; raises Late at ``deadline``."""

    def has_verdict(self, base: str, seq: int, rank: int) -> bool: ...

    def peek(self, base: str, seq: int, rank: int) -> bytes | None:
        """The verdict for member ``rank`` if it is there, without waiting
        (nor changing the connection's timeout: for another thread's look,
        on a connection others share)."""

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


def wait_on(store: Any, deadline: Deadline, request: Callable[[], T]) -> T:
    """The one way syncdeco waits on a store: ``request`` (a store request
    that waits for its keys with the connection's timeout: ``get``,
    ``multi_get``, ``wait``) with the timeout set to what is left of
    ``deadline`` (in chunks of an hour where it has no end), again until
    the deadline passes; then :class:`Late`.  A wait never ends before its
    deadline, so a store's client logs a timed-out wait only where the
    sync point itself times out, or once an hour in a wait without end (a
    shorter wait, to look elsewhere now and then, would make it log each
    time: look from another thread).  Any other store error means the store
    is gone: :class:`StoreLost`; a broken connection raises torch's
    ``DistNetworkError`` as it is, for the caller to read."""
    short = False  # whether it set a timeout under SHORT_WAIT
    try:
        while True:
            left = deadline.left()
            if left is None:
                store.set_timeout(_FOREVER)
            else:
                short = short or left < SHORT_WAIT
                store.set_timeout(timedelta(seconds=max(left, MIN_WAIT)))
            try:
                return request()
            except dist.QueueEmptyError:
                raise  # (a queue's pop: not the store's loss; the caller waits again)
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc).lower():
                    raise StoreLost(
                        f"syncdeco lost the process group's store while waiting: {exc}. "
                        f"Rank 0 or the launcher may have exited."
                    ) from exc
                if deadline.passed():
                    raise Late from None
    finally:
        if short:  # (the requests after it wait for their replies with it)
            store.set_timeout(_FOREVER)


class Keys:
    """Frames and verdicts under keys of their own, one set per sync point."""

    __slots__ = ("store",)

    def __init__(self, store: Any) -> None:  # a c10d Store
        self.store = store

    def send(self, base: str, seq: int, rank: int, frame: bytes) -> None:
        self.store.set(f"{base}/u/{seq}/{rank}", frame)

    def collect(
        self, base: str, seq: int, members: Sequence[int], deadline: Deadline
    ) -> tuple[dict[int, bytes], list[int]]:
        keys = [f"{base}/u/{seq}/{m}" for m in members]
        if len(keys) == 1:
            # One member: its frame is often there already (the main's way
            # back to the sync point is longer than its member's), and then
            # one request reads it where a waiting read takes two.  (Only
            # this main reads this key, and it is not waiting for it: see
            # ABSENT.)
            frame = bytes(self.store.compare_set(keys[0], ABSENT, ABSENT))
            if frame != ABSENT:
                return {members[0]: frame}, []
        try:
            # multi_get waits for its keys itself, with the connection's
            # timeout: one wait less than wait() and then multi_get().
            frames = wait_on(self.store, deadline, lambda: self.store.multi_get(keys))
            return dict(zip(members, frames, strict=True)), []
        except Late:
            pass
        # Out of time (a rare path): take what is there.
        here = self.arrived(base, seq, members)
        frames = self.store.multi_get([f"{base}/u/{seq}/{m}" for m in here]) if here else []
        return dict(zip(here, frames, strict=True)), [m for m in members if m not in here]

    def arrived(self, base: str, seq: int, members: Sequence[int]) -> list[int]:
        return [m for m in members if self.store.check([f"{base}/u/{seq}/{m}"])]

    def answer(self, base: str, seq: int, members: Sequence[int], verdict: bytes) -> None:
        self.store.set(f"{base}/d/{seq}", verdict)

    def receive(self, base: str, seq: int, rank: int, deadline: Deadline) -> bytes:
        key = f"{base}/d/{seq}"
        if deadline.passed() and not self.store.check([key]):
            raise Late  # (a wait of no time would make the store's client log one)
        return bytes(wait_on(self.store, deadline, lambda: self.store.get(key)))  # get waits

    def has_verdict(self, base: str, seq: int, rank: int) -> bool:
        return bool(self.store.check([f"{base}/d/{seq}"]))

    def peek(self, base: str, seq: int, rank: int) -> bytes | None:
        key = f"{base}/d/{seq}"  # (not compare_set: others may wait for it, see ABSENT)
        return bytes(self.store.get(key)) if self.store.check([key]) else None

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
