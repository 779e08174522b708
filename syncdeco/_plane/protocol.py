"""The sync protocol's decisions, as pure functions over frames.

No store, no torch: given what the members of a scope sent (their frames)
and who never came, :func:`judge` says what every rank of the scope is told
(the verdict), and :func:`raise_for` turns a verdict into the error a rank
raises.  The exchange (``exchange.py``) moves frames and verdicts; this
module decides.

A frame is what a member sends its scope's main at a sync point::

    (seq, rank, kind, name, call, failure, where, give_up)

With the node tier, ranks whose frames agree (the same sync point, no
failure) travel as one :class:`Agreed` group instead, so that rank 0 reads a
node in a few steps, not one frame per rank.

``failure`` is a :class:`Failure` as a tuple or None, ``where`` the sync
point's description, ``give_up`` the wall-clock time the member stops
waiting (None: never).  A verdict is ``(seq, code, detail, extra)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import astuple
from typing import Final, NamedTuple, cast

from .._backend import Failure, SyncPoint
from .._errors import (
    PeerFailedError,
    RankExitedError,
    RankKilledError,
    RankLostError,
    SyncError,
    SyncMismatchError,
    SyncTimeoutError,
)

__all__ = [
    "FAILED",
    "MISMATCH",
    "OK",
    "TIMEOUT",
    "Agreed",
    "Frame",
    "agrees",
    "exit_frame",
    "failed",
    "gone_in",
    "judge",
    "raise_for",
    "stand_in",
]

OK: Final = 0
FAILED: Final = 1
MISMATCH: Final = 2
TIMEOUT: Final = 3

# A lost rank's exc_type where the job's store was lost with it (its
# lost_host is then the store's address).
STORE_LOST: Final = "<the job's store>"

Verdict = tuple[object, ...]


class Frame(NamedTuple):
    """What a member tells its scope's main at one sync point."""

    seq: int
    rank: int
    kind: str
    name: str
    call: int  # the sync point's count
    failure: tuple[object, ...] | None
    where: str
    give_up: float | None

    @classmethod
    def of(
        cls, seq: int, rank: int, point: SyncPoint, failure: Failure | None, give_up: float | None
    ) -> Frame:
        failed = None if failure is None else astuple(failure)
        return cls(
            seq, rank, point.kind, point.name, point.count, failed, point.describe(), give_up
        )


class Agreed(NamedTuple):
    """Ranks whose frames say the same: this sync point (``point``: its
    frames' seq, kind, name and call), seen at ``where``, with no failure;
    each rank's ``give_up`` in the order of ``ranks``, and the earliest."""

    point: tuple[int, str, str, int]
    where: str
    ranks: tuple[int, ...]
    give_ups: tuple[float | None, ...]
    first_give_up: float | None

    @classmethod
    def of(cls, frames: Sequence[Frame]) -> Agreed:
        """``frames``, which agree (see :func:`agrees`), as one group."""
        f = frames[0]
        give_ups = tuple(g.give_up for g in frames)
        first = min((g for g in give_ups if g is not None), default=None)
        return cls(
            (f.seq, f.kind, f.name, f.call), f.where, tuple(g.rank for g in frames), give_ups, first
        )


def agrees(frame: Frame, point: tuple[int, str, str, int]) -> bool:
    """Whether ``frame`` says nothing but that its rank is at ``point``."""
    return frame.failure is None and (frame.seq, frame.kind, frame.name, frame.call) == point


def exit_frame(seq: int, failure: Failure) -> Frame:
    """The frame a gone rank is represented by (its process ended)."""
    return Frame(seq, failure.rank, "exit", "", 0, astuple(failure), "its exit", None)


def stand_in(seq: int, rank: int, gone: int) -> Frame:
    """A frame put in ``rank``'s place by the exit of ``gone``, so that a
    main waiting for every member's frame wakes at once (``rank`` itself,
    when it comes, replaces it and reads the verdict: ``gone``'s exit)."""
    return Frame(seq, rank, "absent", "", 0, None, f"(rank {gone} exited)", None)


def failed(seq: int, failures: Sequence[tuple[Failure, str | None]]) -> Verdict:
    """The FAILED verdict: the failure of the lowest rank (where several
    raised), and the sync point where it reported it (None: where the others
    are, or its exit)."""
    first, where = min(failures, key=lambda f: f[0].rank)
    return (seq, FAILED, astuple(first), None if first.exited else where)


def judge(
    seq: int,
    point: SyncPoint,
    main: int,
    failure: Failure | None,
    arrived: Mapping[int, Frame],
    missing: Sequence[int],
    last_seen: Mapping[int, str | None],
    stacks: Mapping[int, tuple[str, str]] | None = None,
    agreed: Sequence[Agreed] = (),
) -> Verdict | None:
    """The verdict of a sync point whose main is ``main``, or None when it
    succeeds (the caller adds the result).  In order of precedence: a rank
    that is gone explains the others' absence; then missing ranks; then a
    failure (a rank that raised reports it at whatever sync point it is at:
    its error is the cause, not the mismatch); then a mismatch.  ``stacks``:
    where each missing rank is, (place, stack), for the TIMEOUT verdict.
    ``agreed``: the ranks that came, beside ``arrived``, in groups."""
    failures = [] if failure is None else [(failure, point.describe())]
    failures += [(unpack(f.failure), f.where) for f in arrived.values() if f.failure is not None]
    exits = [f for f in failures if f[0].exited]
    if exits:
        return failed(seq, exits)
    if missing:
        return (seq, TIMEOUT, tuple(missing), dict(last_seen), dict(stacks or {}))
    if failures:
        return failed(seq, failures)
    mine = (seq, point.kind, point.name, point.count)
    if any((f.seq, f.kind, f.name, f.call) != mine for f in arrived.values()) or any(
        group.point != mine for group in agreed
    ):
        where: dict[str, list[int]] = {point.describe(): [main]}
        came: list[tuple[int, str, tuple[int, ...]]]
        came = [(f.seq, f.where, (rank,)) for rank, f in arrived.items()]
        came += [(group.point[0], group.where, group.ranks) for group in agreed]
        for at, place, ranks in came:
            desc = place if at == seq else f"{place} [its sync #{at}, this is #{seq}]"
            where.setdefault(desc, []).extend(ranks)
        return (seq, MISMATCH, {k: tuple(sorted(v)) for k, v in where.items()}, None)
    return None


def unpack(failure: tuple[object, ...]) -> Failure:
    """A :class:`Failure` from the tuple it travels as."""
    rank, exc_type, message, tb, exited, killed, *lost = failure
    host, ranks = (*lost, "", ())[:2]
    return Failure(
        cast(int, rank),
        cast(str, exc_type),
        cast(str, message),
        cast(str, tb),
        cast(bool, exited),
        cast(bool, killed),
        cast(str, host),
        tuple(cast("tuple[int, ...]", ranks)),
    )


def gone_in(verdict: Verdict) -> int | None:
    """The rank whose exit this verdict reports, if it does."""
    if verdict[1] == FAILED:
        failure = unpack(cast(tuple[object, ...], verdict[2]))
        if failure.exited:
            return failure.rank
    return None


def raise_for(
    verdict: Verdict,
    point: SyncPoint,
    observer: int,
    timeout: float | None,
) -> None:
    """Raise what ``verdict`` means for rank ``observer``; return if it is
    this rank's own failure (the caller re-raises its own exception)."""
    code, detail = verdict[1], verdict[2]
    if code == FAILED:
        failure = unpack(cast(tuple[object, ...], detail))
        if failure.rank == observer:
            return
        raised_at = cast("str | None", verdict[3])
        if failure.lost_host:
            raise RankLostError(
                rank=failure.rank,
                host=failure.lost_host,
                ranks=failure.lost_ranks,
                point=point.describe(),
                observer=observer,
                store=failure.exc_type == STORE_LOST,
            )
        kind = (
            RankKilledError
            if failure.killed
            else RankExitedError
            if failure.exited
            else PeerFailedError
        )
        raise kind(
            rank=failure.rank,
            exc_type=failure.exc_type,
            message=failure.message,
            remote_traceback=failure.traceback,
            point=point.describe(),
            observer=observer,
            raised_at=raised_at,
        )
    if code == MISMATCH:
        raise SyncMismatchError(points=detail, observer=observer)  # type: ignore[arg-type]
    if code == TIMEOUT:
        stacks = cast("Mapping[int, tuple[str, str]]", verdict[4] if len(verdict) > 4 else {})
        raise SyncTimeoutError(
            missing=detail,  # type: ignore[arg-type]
            point=point.describe(),
            timeout=timeout or 0.0,
            observer=observer,
            last_seen=cast("Mapping[int, str | None] | None", verdict[3]),
            stacks={r: stack for r, (_, stack) in stacks.items()},
            places={r: place for r, (place, _) in stacks.items()},
        )
    raise SyncError(f"rank {observer} got an unknown verdict {code!r} at {point.describe()}")
