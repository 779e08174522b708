"""The watcher: a thread beside each rank's sync points that logs, once per
``warn_after`` interval, about a sync point that waits too long.

It reads only what the waiting thread recorded (:class:`Wait`) and the
exchange's memory of where the others were last seen: it sends nothing to
the store, so thousands of waiting ranks cost the store nothing.

With the node tier, a waiting node's main (and its first other rank) also
look at the job's store for a verdict every ``POLL`` seconds: the waiting
thread hands the look over (``Wait.look``), and this thread makes it on
its own connections, so that the waiting thread's store wait never times
out early (a store client logs each wait that times out).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, final

from .._backend import warn_interval
from .._errors import whereabouts

__all__ = ["Wait", "Watched", "start_watcher", "warn"]

_IDLE: Final = 1.0  # seconds between looks (sd.init(warn_after=...) may change the interval)

_log = logging.getLogger("syncdeco")


@final
@dataclass(slots=True)
class Wait:
    """What a rank is waiting for right now, for the watcher thread."""

    since: float
    point: str
    lead: bool
    main: int
    members: Sequence[int]
    base: str
    seq: int
    mail: Any = None  # the transport to look with, if not over the exchange's spare connection
    look: Callable[[], None] | None = None  # made every ``every`` seconds meanwhile
    every: float = 0.0
    logged: float = field(init=False)
    looked: float = field(init=False)

    def __post_init__(self) -> None:
        self.logged = self.looked = self.since


class Watched(Protocol):
    """What the watcher reads of an exchange."""

    rank: int
    spare: Any
    transport: Callable[[Any], Any]  # a store connection's transport
    waiting: Wait | None

    def last_seen(self, ranks: Sequence[int]) -> dict[int, str | None]: ...

    def stacks(self, ranks: Sequence[int], store: Any = None) -> dict[int, tuple[str, str]]: ...


def start_watcher(exchange: Watched) -> threading.Thread:
    thread = threading.Thread(
        target=_watch, args=(weakref.ref(exchange),), name="syncdeco-watch", daemon=True
    )
    thread.start()
    return thread


def _watch(ref: weakref.ref[Watched]) -> None:
    while True:
        interval = warn_interval()
        time.sleep(_IDLE if interval is None else min(_IDLE, interval / 4))
        exchange = ref()
        if exchange is None:
            return
        wait = exchange.waiting
        now = time.monotonic()
        if wait is not None and wait.look is not None and now - wait.looked >= wait.every:
            wait.looked = now
            try:
                wait.look()
            except Exception as exc:  # the waiting thread gives up at its deadline
                _log.debug("syncdeco's watcher could not look at the job's store: %r", exc)
        if wait is not None and interval is not None and now - wait.logged >= interval:
            wait.logged = now
            try:
                warn(exchange, wait, now - wait.since)
            except Exception as exc:  # the watcher must never take the job down
                _log.debug("syncdeco's watcher could not report: %r", exc)
        del exchange, wait  # hold no exchange while asleep, so it can be collected


def warn(ex: Watched, wait: Wait, waited: float) -> None:
    """Log who this rank has been waiting for (the watcher calls it)."""
    if wait.lead:
        # Through the spare connection: the waiting thread holds the
        # exchange's own for its whole wait.
        look = wait.mail
        if look is None and ex.spare is not None:
            look = ex.transport(ex.spare)
        here = set() if look is None else set(look.arrived(wait.base, wait.seq, wait.members))
        missing = [r for r in wait.members if r not in here]
        seen = ex.last_seen(missing)
        places = {} if ex.spare is None else ex.stacks(missing, ex.spare)
        _log.warning(
            "rank %d has waited %.0fs at %s: arrived %s; missing %s",
            ex.rank,
            waited,
            wait.point,
            ", ".join(map(str, sorted(here))) or "none",
            "; ".join(_where(r, seen[r], places.get(r)) for r in missing) or "none",
            extra={"rank": ex.rank},
        )
    else:
        seen = ex.last_seen([wait.main])
        places = {} if ex.spare is None else ex.stacks([wait.main], ex.spare)
        _log.warning(
            "rank %d has waited %.0fs at %s for the main rank %s",
            ex.rank,
            waited,
            wait.point,
            _where(wait.main, seen[wait.main], places.get(wait.main)),
            extra={"rank": ex.rank},
        )


def _where(rank: int, seen: str | None, place: tuple[str, str] | None) -> str:
    """A missing rank for a log line: where it was last seen and where it is."""
    if place is None:
        return whereabouts(rank, seen)
    return f"{whereabouts(rank, seen)}, which {place[0]}; its stack:\n{place[1]}"
