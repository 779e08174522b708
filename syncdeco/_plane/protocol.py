"""The sync protocol's rules, as pure functions over values (no I/O).

The exchange (``exchange.py``) asks, and does what it is told:

* :func:`route`: which way a rank takes at a sync point (alone, the main,
  a member, a node's main, a rank of a node that meets rank 0 through its
  node's main, or one cut off from its node that falls back to the job's
  store), with whom it meets and how many tiers lie above it;
* :func:`main_gone` and :func:`gone_frames`: the shortcut for ranks
  already gone (nobody waits for a rank that will never come);
* :func:`gathered`: what the frames a main collected say;
* :func:`judge`: the verdict of a sync point, in the documented order of
  precedence; :func:`failed`: the verdict of a failure;
* :func:`to_ask` and :func:`withdrawal`: the withdrawal rule (a member that
  gave up before the main could answer turns the verdict into a timeout);
* :func:`marks_gone` and :func:`noted`: which verdict or frame tells a rank
  that another has exited;
* :func:`waiters` and :func:`waiters_elsewhere`: who waits for a rank, and
  where, so that its exit is written there;
* :func:`raise_for`: the error a rank raises for a verdict.

The values themselves (frames, verdicts) are in ``frames.py``, the
deadline arithmetic in ``deadline.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, final

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
from .frames import Agreed, Failed, Frame, Mismatch, NodeFrame, Ok, Timeout, Verdict

__all__ = [
    "ALONE",
    "FALLBACK",
    "MAIN",
    "MEMBER",
    "NODE_MAIN",
    "NODE_MEMBER",
    "STORE_LOST",
    "Layout",
    "Place",
    "Route",
    "failed",
    "gathered",
    "gone_frames",
    "judge",
    "main_gone",
    "marks_gone",
    "not_started",
    "noted",
    "raise_for",
    "route",
    "to_ask",
    "waiters",
    "waiters_elsewhere",
    "withdrawal",
]

# A lost rank's exc_type where the job's store was lost with it (its
# lost_host is then the store's address).
STORE_LOST: Final = "<the job's store>"

ALONE: Final = "alone"  # nobody to meet: the result is its own
MAIN: Final = "main"  # collects its members' frames and answers them
MEMBER: Final = "member"  # sends its main a frame and waits for the verdict
NODE_MAIN: Final = "node main"  # gathers its node, sends rank 0 one frame, relays
NODE_MEMBER: Final = "node member"  # through its node's main
FALLBACK: Final = "fallback"  # cut off from its node: rank 0's verdict on the job's store


@final
@dataclass(frozen=True, slots=True)
class Place:
    """Where a rank lives: its node's key, its rank on the node, how many
    ranks the node has, and which they are by local rank (None: the
    launcher does not say)."""

    node: str
    local_rank: int
    local_size: int | None
    ranks: tuple[int, ...] | None = None


@final
@dataclass(frozen=True, slots=True)
class Layout:
    """The node tier, as one rank sees it once it is up: its node's main
    and other ranks, whom rank 0 waits for on the job's store (rank 0's
    own node and every other node's main), and the ranks of rank 0's node."""

    main: int
    members: tuple[int, ...]
    slots: tuple[int, ...]
    zero: tuple[int, ...] = (0,)


@final
@dataclass(frozen=True, slots=True)
class Route:
    """The way a rank takes at one sync point: ``kind`` (see the constants),
    the scope (``"w"``: the world, ``"l"``: its node), the rank whose verdict
    it takes (``main``; for a node's main, rank 0), the ranks it waits for
    (``members``), and how many tiers above it judge (each adds a grace to
    its deadline: see ``Deadline.extended``)."""

    kind: str
    scope: str
    main: int
    members: tuple[int, ...] = ()
    tiers: int = 0


def route(
    rank: int,
    world_size: int,
    local: bool,
    *,
    layout: Layout | None = None,
    reachable: bool = True,
    node: tuple[int, tuple[int, ...]] | None = None,
) -> Route:
    """This rank's way at a sync point (``local``: of its node).  ``layout``:
    the node tier, once it is up; ``reachable``: whether this rank still
    reaches its node's store; ``node``: (its node's main, the node's other
    ranks, known to the main only), needed for a local sync point."""
    if local and world_size > 1:
        if node is None:
            raise ValueError(f"rank {rank}: a local sync point needs this rank's node")
        main, members = node
        if main == rank:
            return Route(MAIN if members else ALONE, "l", rank, tuple(members))
        return Route(MEMBER, "l", main, (), 1)
    if layout is not None and rank != 0:
        if rank == layout.main:
            return Route(NODE_MAIN, "w", 0, layout.members, 1)
        if layout.main != 0:
            return Route(NODE_MEMBER if reachable else FALLBACK, "w", layout.main, (), 2)
    members = layout.slots if layout is not None else tuple(range(1, world_size))
    if rank == 0:
        return Route(MAIN if members else ALONE, "w", 0, members)
    return Route(MEMBER, "w", 0, (), 1)


# -- ranks already gone ------------------------------------------------------------------


def not_started(
    layout: Sequence[int] | None,
    absent: Sequence[int],
    started: Callable[[int], bool],
    world_size: int,
) -> list[int]:
    """The ranks to name when a node's local ranks ``absent`` have not
    started (said where they run) in time: the launcher's ``layout`` of the
    node (its ranks by local rank) gives them, unless one of those has
    started (the layout is not the one the launcher used); else every rank
    that has not started, ``absent`` among them.  ``started(rank)``: a look
    at the store."""
    if layout is not None and all(lr < len(layout) for lr in absent):
        guess = [layout[lr] for lr in absent]
        if not any(map(started, guess)):
            return guess
    return [r for r in range(world_size) if not started(r)]


def main_gone(route: Route, gone: Mapping[int, Failure], seq: int) -> Failed | None:
    """A member whose main is gone does not wait: the main's exit is its
    verdict."""
    if route.kind in (MEMBER, NODE_MEMBER, FALLBACK) and route.main in gone:
        return Failed(seq, gone[route.main])
    return None


def gone_frames(route: Route, rank: int, gone: Mapping[int, Failure], seq: int) -> dict[int, Frame]:
    """A main (or a node's main) whose members include ranks that are gone
    answers at once, with their exits as their frames.  The world's main
    hears of any rank's exit (through its node's main with tiers), so any
    gone rank counts at a world sync point; elsewhere, only members."""
    if not gone:
        return {}
    world_main = route.kind == MAIN and route.scope == "w"
    return {
        r: Frame.exit(seq, failure)
        for r, failure in gone.items()
        if r != rank and (world_main or r in route.members)
    }


def noted(frame: Frame) -> Failure | None:
    """The exit a member's frame reports, if it does."""
    return frame.failure if frame.kind == "exit" else None


def marks_gone(verdict: Verdict, main: int, tiered_world: bool) -> int | None:
    """The rank a member remembers as gone from ``verdict``, from ``main``:
    its main itself, or, at a world sync point with tiers (where a rank
    hears of exits on other nodes only so), any rank whose exit it reports."""
    if isinstance(verdict, Failed):
        gone = verdict.gone
        if gone is not None and (gone == main or tiered_world):
            return gone
    return None


# -- a main judges -----------------------------------------------------------------------


def gathered(
    sent: Iterable[Frame | NodeFrame],
) -> tuple[dict[int, Frame], list[int], dict[int, str | None], list[Agreed]]:
    """What the frames a main collected say (a rank's own, or with tiers, a
    node's): (frames by rank, the ranks its nodes' mains found missing,
    where those were last seen by them, groups of ranks that agree)."""
    arrived: dict[int, Frame] = {}
    missing: list[int] = []
    told: dict[int, str | None] = {}
    groups: list[Agreed] = []
    for frame in sent:
        if isinstance(frame, Frame):
            arrived[frame.rank] = frame
            continue
        missing += frame.missing
        told.update(frame.seen)
        arrived.update((f.rank, f) for f in frame.frames)
        groups += frame.groups
    return arrived, missing, told, groups


def failed(seq: int, failures: Sequence[tuple[Failure, str | None]]) -> Failed:
    """The verdict of a failure: the lowest rank's (where several raised),
    and the sync point where it reported it (None: where the others are, or
    its exit)."""
    first, where = min(failures, key=lambda f: f[0].rank)
    return Failed(seq, first, None if first.exited else where)


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
) -> Failed | Mismatch | Timeout | None:
    """The verdict of a sync point whose main is ``main``, or None when it
    succeeds (the caller adds the result).  In order of precedence: a rank
    that is gone explains the others' absence; then missing ranks; then a
    failure (a rank that raised reports it at whatever sync point it is at:
    its error is the cause, not the mismatch); then a mismatch.  ``stacks``:
    where each missing rank is, (place, stack), for the timeout.
    ``agreed``: the ranks that came, beside ``arrived``, in groups."""
    failures = [] if failure is None else [(failure, point.describe())]
    failures += [(f.failure, f.where) for f in arrived.values() if f.failure is not None]
    exits = [f for f in failures if f[0].exited]
    if exits:
        return failed(seq, exits)
    if missing:
        return Timeout(seq, tuple(missing), dict(last_seen), dict(stacks or {}))
    if failures:
        return failed(seq, failures)
    mine = (seq, point.kind, point.name, point.count)
    if any(f.point != mine for f in arrived.values()) or any(g.point != mine for g in agreed):
        where: dict[str, list[int]] = {point.describe(): [main]}
        came: list[tuple[int, str, tuple[int, ...]]]
        came = [(f.seq, f.where, (rank,)) for rank, f in arrived.items()]
        came += [(group.point[0], group.where, group.ranks) for group in agreed]
        for at, place, ranks in came:
            desc = place if at == seq else f"{place} [its sync #{at}, this is #{seq}]"
            where.setdefault(desc, []).extend(ranks)
        return Mismatch(seq, {k: tuple(sorted(v)) for k, v in where.items()})
    return None


def to_ask(
    arrived: Mapping[int, Frame], agreed: Sequence[Agreed], now: float, margin: float
) -> list[int]:
    """The members a main asks whether they gave up before it could answer:
    only those whose own deadline (wall clock) is before ``now + margin``
    (a margin for clocks that differ between hosts), so a sync point that
    completes in time costs nothing extra."""
    near = now + margin
    asked = [m for m, f in arrived.items() if f.give_up is not None and f.give_up <= near]
    for group in agreed:
        if group.first_give_up is not None and group.first_give_up <= near:
            asked += [
                m
                for m, give_up in zip(group.ranks, group.give_ups, strict=True)
                if give_up is not None and give_up <= near
            ]
    return asked


def withdrawal(verdict: Verdict, withdrawn: bool, main: int) -> Verdict:
    """A member withdrew before the main (``main``) could answer: the
    verdict, whatever it was, is that the main came too late (a timeout
    already names who was missing)."""
    if withdrawn and not isinstance(verdict, Timeout):
        return Timeout(verdict.seq, (main,))
    return verdict


# -- who waits for a rank, and where --------------------------------------------------------

# (store: "job" or "node", scope, that scope's main, the members whose
# frames it waits for, the key the rank's frame goes under)
Waiter = tuple[str, str, int, Sequence[int], int]


def waiters(
    rank: int, world_size: int, layout: Layout | None, node_main: int | None
) -> list[Waiter]:
    """Who waits for ``rank`` (this rank, or one of its node), and where.
    ``node_main``: this rank's node's main, if it knows it."""
    if layout is None:
        out: list[Waiter] = [("job", "w", 0, range(1, world_size), rank)]
        if node_main is not None:
            out.append(("job", "l", node_main, range(0), rank))  # a member knows no others
        return out
    node_ranks = (layout.main, *layout.members)
    local = ("node", "l", layout.main, node_ranks, rank)
    if rank == 0 or rank in layout.slots:
        out = [("job", "w", 0, layout.slots, rank), local]
        if rank == layout.main and rank != 0:
            out.append(("node", "w", rank, node_ranks, rank))
        return out
    # A rank of a node that meets rank 0 through its node's main: rank 0
    # waits for the node's frame, and the node's main for the rank's.
    return [
        ("job", "w", 0, layout.slots, layout.main),
        ("node", "w", layout.main, node_ranks, rank),
        local,
    ]


def waiters_elsewhere(
    rank: int, world_size: int, layout: Layout | None, node: Sequence[int]
) -> list[Waiter]:
    """Who waits, on the job's store, for ``rank`` of another node whose
    ranks are ``node``: rank 0 at world sync points, for its frame, or for
    its node main's where the node tier is up; and every rank, for rank
    0's verdict, where ``rank`` is rank 0.  (What waits on that node's own
    store went with it.)"""
    members: Sequence[int] = range(1, world_size) if layout is None else layout.slots
    slot = rank
    if layout is not None and rank not in layout.slots and rank != 0:
        slot = min((r for r in node if r in layout.slots), default=rank)
    return [("job", "w", 0, members, slot)]


# -- the error a verdict means -------------------------------------------------------------


def raise_for(verdict: Verdict, point: SyncPoint, observer: int, timeout: float | None) -> None:
    """Raise what ``verdict`` means for rank ``observer``; return if it is
    this rank's own failure (the caller re-raises its own exception) or
    the sync point succeeded."""
    if isinstance(verdict, Ok):
        return
    if isinstance(verdict, Failed):
        failure = verdict.failure
        if failure.rank == observer:
            return
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
            raised_at=verdict.where,
        )
    if isinstance(verdict, Mismatch):
        raise SyncMismatchError(points=dict(verdict.points), observer=observer)
    if isinstance(verdict, Timeout):
        raise SyncTimeoutError(
            missing=verdict.missing,
            point=point.describe(),
            timeout=timeout or 0.0,
            observer=observer,
            last_seen=verdict.last_seen,
            stacks={r: stack for r, (_, stack) in verdict.stacks.items()},
            places={r: place for r, (place, _) in verdict.stacks.items()},
        )
    raise SyncError(f"rank {observer} got an unknown verdict {verdict!r} at {point.describe()}")
