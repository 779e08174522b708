"""What a rank's exit says, and where it is written.

The exception that ended the program, if any; and the keys where the ranks
that wait for the exiting rank look (:func:`say_exit`).

syncdeco wraps ``sys.excepthook`` once to note the exception that ends the
program: ``sys.last_value`` alone misleads, since pytest and IPython set it
for exceptions they caught.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._backend import Failure
from . import protocol
from .transport import Transport

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = [
    "exit_failure",
    "killed_failure",
    "note_uncaught",
    "say_exit",
    "uncaught",
    "waiters",
    "waiters_elsewhere",
]

# Who waits for a rank, and where (see waiters).
Waiter = tuple[str, str, int, Sequence[int], int]

_uncaught: BaseException | None = None  # what ended the program, seen by the hook
_hook: Callable[..., None] | None = None


def note_uncaught() -> None:
    """Wrap sys.excepthook (once) to note the exception that ends the program."""
    global _hook
    if _hook is not None:
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        global _uncaught
        _uncaught = value
        previous(kind, value, tb)

    _hook = sys.excepthook = hook


def uncaught() -> BaseException | None:
    """The exception that is ending the program, if one is."""
    exc: object = _uncaught
    if exc is None and (_hook is None or sys.excepthook is not _hook):
        # Without syncdeco's hook in place (no sync point ran yet, or another
        # hook replaced it), the interpreter's note is the best there is.
        exc = getattr(sys, "last_value", None)
    return exc if isinstance(exc, BaseException) else None


def killed_failure(rank: int) -> Failure:
    """How the end of ``rank``'s process travels when it could not say so."""
    return Failure(rank, "", "", "", exited=True, killed=True)


def exit_failure(rank: int, exc: BaseException | None) -> Failure:
    """How the exit of ``rank`` travels (with ``exc`` if one ended it)."""
    if exc is None:
        return Failure(rank, "", "", "", exited=True)
    return replace(Failure.from_exception(rank, exc), exited=True)


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


# -- writing an exit where the others wait ---------------------------------------------


def say_exit(
    ex: Exchange,
    failure: Failure,
    store: Any,
    seqs: Mapping[str, int],
    *,
    first_hand: bool,
    spare: bool = False,
    where: Sequence[Waiter] | None = None,
) -> bool:
    """Write ``failure`` (an exit) where the ranks that wait for its rank
    look: its frame (or, for a main, the verdict) at the next sync point
    of each scope, and stand-ins for the other members' frames, so that
    a main waiting for every frame (a slow member among them) wakes at
    once.  First hand, in one request per store with no reply.  Second
    hand, at this rank's current sync point and the next, never
    replacing what is there, and only if nobody did it before: a
    compare-and-set on one key per rank settles that.  ``store``: the
    job's store; the node's store, with tiers, is this exchange's own
    connection to it, or its spare (``spare``, or second hand).
    ``where``: who waits for that rank, where :func:`waiters` would not
    know (a rank of another node: see :func:`waiters_elsewhere`)."""
    gone = dumps(astuple(failure))
    key = f"{ex.prefix}/gone/{failure.rank}"
    if not first_hand and bytes(store.compare_set(key, "", gone)) != gone:
        return False
    tier = ex.tier
    node = None
    if tier is not None and (first_hand or failure.rank != tier.main):
        # (A node's main that died took its node's store with it.)
        node = tier.spare if spare or not first_hand else tier.store
    posts: dict[int, tuple[Transport, list[Any], list[Any]]] = {}
    for on, scope, main, members, slot in waiters(ex, failure.rank) if where is None else where:
        conn = store if on == "job" else node
        if conn is None:
            continue  # the node's store is gone with its main
        mail, frames, verdicts = posts.setdefault(
            id(conn),
            (type(ex.mail)(conn), [], []),  # type: ignore[call-arg]
        )
        base = ex.base(scope, main)
        seq = seqs[scope]
        for at in (seq + 1,) if first_hand else range(max(seq, 1), seq + 2):
            if failure.rank == main:
                verdicts.append((base, at, dumps(protocol.failed(at, [(failure, None)]))))
                continue
            frame = dumps(tuple(protocol.exit_frame(at, failure)))
            if first_hand:
                frames.append((base, at, slot, frame))
            elif not mail.offer_frame(base, at, slot, frame):
                continue  # it did reach that sync point itself (or its node's main did)
            frames += [
                (base, at, m, dumps(tuple(protocol.stand_in(at, m, failure.rank))))
                for m in members
                if m not in (slot, main)
            ]
    for n, (mail, frames, verdicts) in enumerate(posts.values()):
        if first_hand:
            mail.post(frames, verdicts, [(key, gone)] if n == 0 else [])
            continue
        for base, at, verdict in verdicts:
            mail.offer_verdict(base, at, -1, verdict)
        for base, at, rank, frame in frames:  # stand-ins
            mail.offer_frame(base, at, rank, frame)
    return True


def waiters(ex: Exchange, rank: int) -> list[Waiter]:
    """Who waits for ``rank`` (this rank, or one of its node), and where:
    (store: "job" or "node", scope, that scope's main, the members whose
    frames it waits for, the key ``rank``'s frame goes under)."""
    tier = ex.tier
    if tier is None:
        out: list[Waiter] = [("job", "w", 0, range(1, ex.world_size), rank)]
        node = ex.node_main()
        if node is not None:
            out.append(("job", "l", node, range(0), rank))  # a member does not know the others
        return out
    node_ranks = (tier.main, *tier.members)
    local = ("node", "l", tier.main, node_ranks, rank)
    if rank == 0 or rank in tier.slots:
        out = [("job", "w", 0, tier.slots, rank), local]
        if rank == tier.main and rank != 0:
            out.append(("node", "w", rank, node_ranks, rank))
        return out
    # A rank of a node that meets rank 0 through its node's main: rank 0
    # waits for the node's frame, and the node's main for the rank's.
    return [
        ("job", "w", 0, tier.slots, tier.main),
        ("node", "w", tier.main, node_ranks, rank),
        local,
    ]


def waiters_elsewhere(ex: Exchange, rank: int, node: Sequence[int]) -> list[Waiter]:
    """Who waits, on the job's store, for ``rank`` of another node whose
    ranks are ``node``: rank 0 at world sync points, for its frame, or for
    its node main's where the node tier is up; and every rank, for rank
    0's verdict, where ``rank`` is rank 0.  (What waits on that node's own
    store went with it.)"""
    tier = ex.tier
    members: Sequence[int] = range(1, ex.world_size) if tier is None else tier.slots
    slot = rank
    if tier is not None and rank not in tier.slots and rank != 0:
        slot = min((r for r in node if r in tier.slots), default=rank)
    return [("job", "w", 0, members, slot)]
