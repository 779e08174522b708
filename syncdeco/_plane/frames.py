"""What travels at a sync point, as small named values, and its one codec.

A member sends its scope's main a :class:`Frame`; with the node tier, a
node's main sends rank 0 one :class:`NodeFrame` for its whole node (the
frames that agree travel as :class:`Agreed` groups).  The main answers every
member with one verdict: :class:`Ok`, :class:`Failed`, :class:`Mismatch` or
:class:`Timeout`.

:func:`dump_frame` / :func:`load_frame` and :func:`dump_verdict` /
:func:`load_verdict` are the only way these cross a store: plain tuples,
pickled (the stores are the job's own: see the README on what syncdeco
trusts).  No torch, no store: values only.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field
from typing import Final, NamedTuple, TypeAlias, final

from .._backend import Failure, SyncPoint

__all__ = [
    "Agreed",
    "Failed",
    "Frame",
    "Mismatch",
    "NodeFrame",
    "Ok",
    "Timeout",
    "Verdict",
    "dump_failure",
    "dump_frame",
    "dump_verdict",
    "load_failure",
    "load_frame",
    "load_verdict",
]

Point = tuple[int, str, str, int]  # a frame's (seq, kind, name, call): which sync point

_HIGHEST: Final = pickle.HIGHEST_PROTOCOL
_NODE: Final = "node"  # the first item of a node frame on the wire
_OK, _FAILED, _MISMATCH, _TIMEOUT = 0, 1, 2, 3  # a verdict's first item on the wire


class Frame(NamedTuple):
    """What a member tells its scope's main at one sync point.  ``where``:
    the sync point's description; ``give_up``: the wall-clock time the
    member stops waiting (None: never).  (A named tuple, not a dataclass:
    one is made, sent and read at every sync point, by every rank.)"""

    seq: int
    rank: int
    kind: str
    name: str
    call: int  # the sync point's count
    failure: Failure | None
    where: str
    give_up: float | None

    @classmethod
    def of(
        cls, seq: int, rank: int, point: SyncPoint, failure: Failure | None, give_up: float | None
    ) -> Frame:
        return cls(
            seq, rank, point.kind, point.name, point.count, failure, point.describe(), give_up
        )

    @classmethod
    def exit(cls, seq: int, failure: Failure) -> Frame:
        """The frame a gone rank is represented by (its process ended)."""
        return cls(seq, failure.rank, "exit", "", 0, failure, "its exit", None)

    @classmethod
    def stand_in(cls, seq: int, rank: int, gone: int) -> Frame:
        """A frame put in ``rank``'s place by the exit of ``gone``, so that a
        main waiting for every member's frame wakes at once (``rank`` itself,
        when it comes, replaces it and reads the verdict: ``gone``'s exit)."""
        return cls(seq, rank, "absent", "", 0, None, f"(rank {gone} exited)", None)

    @property
    def point(self) -> Point:
        return (self.seq, self.kind, self.name, self.call)

    def agrees(self, point: Point) -> bool:
        """Whether this frame says nothing but that its rank is at ``point``."""
        return self.failure is None and self.point == point


class Agreed(NamedTuple):
    """Ranks whose frames say the same: this sync point (``point``), seen at
    ``where``, with no failure; each rank's ``give_up`` in the order of
    ``ranks``, and the earliest."""

    point: Point
    where: str
    ranks: tuple[int, ...]
    give_ups: tuple[float | None, ...]
    first_give_up: float | None

    @classmethod
    def of(cls, frames: Sequence[Frame]) -> Agreed:
        """``frames``, which agree (see :meth:`Frame.agrees`), as one group."""
        give_ups = tuple(g.give_up for g in frames)
        first = min((g for g in give_ups if g is not None), default=None)
        return cls(frames[0].point, frames[0].where, tuple(g.rank for g in frames), give_ups, first)


@final
@dataclass(frozen=True, slots=True)
class NodeFrame:
    """What a node's main sends rank 0: its node's frames that say something
    of their own (a failure, another sync point, an exit), the groups of
    those that agree with the main's, the ranks that did not come in time,
    and where it last saw them."""

    frames: tuple[Frame, ...]
    groups: tuple[Agreed, ...]
    missing: tuple[int, ...] = ()
    seen: Mapping[int, str | None] = field(default_factory=dict)

    @classmethod
    def of(
        cls, frames: Sequence[Frame], missing: Sequence[int], seen: Mapping[int, str | None]
    ) -> NodeFrame:
        """``frames`` (the main's own first): those that agree with the
        main's own (at nearly every sync point, all of them) as one group
        per place they were seen at, the others as they are."""
        point = frames[0].point
        odd: list[Frame] = []
        same: dict[str, list[Frame]] = {}
        for frame in frames:
            if frame.agrees(point):
                same.setdefault(frame.where, []).append(frame)
            else:
                odd.append(frame)
        groups = tuple(Agreed.of(group) for group in same.values())
        return cls(tuple(odd), groups, tuple(missing), dict(seen))


# -- verdicts ---------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Ok:
    """Every rank met, and all is well: the result (pickled, None: none)
    and how its tensors travel (``pernode``'s plan)."""

    seq: int
    data: bytes | None = None
    plan: tuple[str, list[object]] = ("bcast", [])


@final
@dataclass(frozen=True, slots=True)
class Failed:
    """A rank raised, or its process ended (``failure.exited``): the
    lowest such rank's failure, and the sync point where it reported it
    (None: where the others are, or its exit)."""

    seq: int
    failure: Failure
    where: str | None = None

    @property
    def gone(self) -> int | None:
        """The rank whose exit this verdict reports, if it does."""
        return self.failure.rank if self.failure.exited else None


@final
@dataclass(frozen=True, slots=True)
class Mismatch:
    """The ranks came to different sync points: which ranks came where."""

    seq: int
    points: Mapping[str, tuple[int, ...]]


@final
@dataclass(frozen=True, slots=True)
class Timeout:
    """Ranks never came: who, where each was last seen, and (place, stack)
    of each that could say where it is."""

    seq: int
    missing: tuple[int, ...]
    last_seen: Mapping[int, str | None] = field(default_factory=dict)
    stacks: Mapping[int, tuple[str, str]] = field(default_factory=dict)


Verdict: TypeAlias = Ok | Failed | Mismatch | Timeout


# -- the codec -------------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=_HIGHEST)


def _failure(raw: tuple[object, ...] | None) -> Failure | None:
    if raw is None:
        return None
    rank, exc_type, message, tb, exited, killed, host, ranks = raw
    return Failure(rank, exc_type, message, tb, exited, killed, host, tuple(ranks))  # type: ignore[arg-type]


def _raw_frame(f: Frame) -> tuple[object, ...]:
    if f.failure is None:
        return tuple(f)
    return (*f[:5], astuple(f.failure), *f[6:])


def _frame(raw: Sequence[object]) -> Frame:
    if raw[5] is None:
        return Frame._make(raw)
    return Frame._make((*raw[:5], _failure(raw[5]), *raw[6:]))  # type: ignore[arg-type]


def dump_frame(frame: Frame | NodeFrame) -> bytes:
    """A rank's frame or a node's, as it travels."""
    if isinstance(frame, Frame):
        return _dumps(_raw_frame(frame))
    groups = [tuple(g) for g in frame.groups]
    odd = [_raw_frame(f) for f in frame.frames]
    return _dumps((_NODE, odd, frame.missing, dict(frame.seen), groups))


def load_frame(data: bytes) -> Frame | NodeFrame:
    """What :func:`dump_frame` wrote."""
    raw = pickle.loads(data)
    if raw[0] != _NODE:
        return _frame(raw)
    _, odd, missing, seen, groups = raw
    return NodeFrame(
        tuple(_frame(f) for f in odd),
        tuple(Agreed._make(g) for g in groups),
        tuple(missing),
        dict(seen),
    )


def dump_verdict(verdict: Verdict) -> bytes:
    """A verdict, as it travels."""
    v = verdict
    if isinstance(v, Ok):
        return _dumps((_OK, v.seq, v.data, v.plan))
    if isinstance(v, Failed):
        return _dumps((_FAILED, v.seq, astuple(v.failure), v.where))
    if isinstance(v, Mismatch):
        return _dumps((_MISMATCH, v.seq, dict(v.points)))
    return _dumps((_TIMEOUT, v.seq, v.missing, dict(v.last_seen), dict(v.stacks)))


def load_verdict(data: bytes) -> Verdict:
    """What :func:`dump_verdict` wrote."""
    code, seq, *rest = pickle.loads(data)
    if code == _OK:
        return Ok(seq, rest[0], rest[1])
    if code == _FAILED:
        return Failed(seq, _failure(rest[0]), rest[1])  # type: ignore[arg-type]
    if code == _MISMATCH:
        return Mismatch(seq, rest[0])
    if code == _TIMEOUT:
        return Timeout(seq, tuple(rest[0]), rest[1], rest[2])
    raise ValueError(f"a verdict of unknown kind {code!r} (seq {seq})")


def dump_failure(failure: Failure) -> bytes:
    """A rank's exit record (``<prefix>/gone/<rank>``)."""
    return _dumps(astuple(failure))


def load_failure(data: bytes) -> Failure:
    """What :func:`dump_failure` wrote."""
    return _failure(pickle.loads(data))  # type: ignore[return-value]
