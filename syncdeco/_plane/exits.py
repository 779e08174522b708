"""What a rank's exit says, and where it is written.

The exception that ended the program, if any; and the keys where the ranks
that wait for the exiting rank look (:func:`say_exit`).

syncdeco wraps ``sys.excepthook`` once to note the exception that ends the
program: ``sys.last_value`` alone misleads, since pytest and IPython set it
for exceptions they caught.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Final, final

from .._backend import Failure
from .frames import Frame, dump_failure, dump_frame, dump_verdict
from .protocol import Waiter, failed
from .transport import Transport

__all__ = [
    "exit_failure",
    "gone_key",
    "killed_failure",
    "note_uncaught",
    "say_exit",
    "uncaught",
]


@final
class _Noted:
    """What ended the program, as syncdeco's excepthook saw it."""

    __slots__ = ("exc", "hook")

    def __init__(self) -> None:
        self.exc: BaseException | None = None
        self.hook: Callable[..., None] | None = None


_NOTED: Final = _Noted()


def note_uncaught() -> None:
    """Wrap sys.excepthook (once) to note the exception that ends the program."""
    if _NOTED.hook is not None:
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        _NOTED.exc = value
        previous(kind, value, tb)

    _NOTED.hook = sys.excepthook = hook


def uncaught() -> BaseException | None:
    """The exception that is ending the program, if one is."""
    exc: object = _NOTED.exc
    if exc is None and (_NOTED.hook is None or sys.excepthook is not _NOTED.hook):
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


# -- writing an exit where the others wait ---------------------------------------------


def gone_key(prefix: str, rank: int) -> str:
    """The key that holds how ``rank`` ended, on the job's store: written
    once (its own notice, or the first second-hand report; see say_exit)."""
    return f"{prefix}/gone/{rank}"


def say_exit(
    failure: Failure,
    store: Any,
    node: Any,
    seqs: Mapping[str, int],
    where: Sequence[Waiter],
    *,
    prefix: str,
    transport: Callable[[Any], Transport],
    first_hand: bool,
    in_flight: bool = False,
) -> bool:
    """Write ``failure`` (an exit) where the ranks that wait for its rank
    look (``where``: see ``protocol.waiters``): its frame (or, for a main,
    the verdict) at the next sync point of each scope, and stand-ins for
    the other members' frames, so that a main waiting for every frame (a
    slow member among them) wakes at once.  First hand, in one request per
    store with no reply.  Second hand, at this rank's current sync point
    and the next, never replacing what is there, and only if nobody wrote
    another end of that rank before: a compare-and-set on one key per rank
    settles that (a second report of the same end goes on, and changes
    nothing).  First hand but ``in_flight`` (another thread of the rank is
    inside a sync point, which it may never finish), at the current sync
    point and the next, like a second-hand report, but as the rank's own
    word on its end.  ``store``: the job's store; ``node``: a connection
    to the node's store, with tiers (None: none, or gone with its main)."""
    gone = dump_failure(failure)
    key = gone_key(prefix, failure.rank)
    if not first_hand and bytes(store.compare_set(key, "", gone)) != gone:
        return False
    posting = first_hand and not in_flight  # sets only: see the docstring
    if in_flight:
        store.set(key, gone)
    posts: dict[int, tuple[Transport, list[Any], list[Any]]] = {}
    for on, scope, main, members, slot in where:
        conn = store if on == "job" else node
        if conn is None:
            continue  # the node's store is gone with its main
        mail, frames, verdicts = posts.setdefault(id(conn), (transport(conn), [], []))
        base = f"{prefix}/{scope}/{main}"
        seq = seqs[scope]
        for at in (seq + 1,) if posting else range(max(seq, 1), seq + 2):
            if failure.rank == main:
                verdicts.append((base, at, dump_verdict(failed(at, [(failure, None)]))))
                continue
            frame = dump_frame(Frame.exit(at, failure))
            if posting:
                frames.append((base, at, slot, frame))
            elif not mail.offer_frame(base, at, slot, frame):
                continue  # it did reach that sync point itself (or its node's main did)
            frames += [
                (base, at, m, dump_frame(Frame.stand_in(at, m, failure.rank)))
                for m in members
                if m not in (slot, main)
            ]
    for n, (mail, frames, verdicts) in enumerate(posts.values()):
        if posting:
            mail.post(frames, verdicts, [(key, gone)] if n == 0 else [])
            continue
        for base, at, verdict in verdicts:
            mail.offer_verdict(base, at, -1, verdict)
        for base, at, rank, frame in frames:  # stand-ins
            mail.offer_frame(base, at, rank, frame)
    return True
