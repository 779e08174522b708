"""The watcher: a thread beside each rank's sync points that logs, once per
``warn_after`` interval, about a sync point that waits too long.

It reads only what the waiting thread recorded (:class:`Wait`) and the
exchange's memory of where the others were last seen: it sends nothing to
the store, so thousands of waiting ranks cost the store nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, final

from .._backend import warn_interval

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = ["Wait", "start_watcher"]

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
    logged: float = field(init=False)

    def __post_init__(self) -> None:
        self.logged = self.since


def start_watcher(exchange: Exchange) -> threading.Thread:
    thread = threading.Thread(
        target=_watch, args=(weakref.ref(exchange),), name="syncdeco-watch", daemon=True
    )
    thread.start()
    return thread


def _watch(ref: weakref.ref[Exchange]) -> None:
    while True:
        interval = warn_interval()
        time.sleep(_IDLE if interval is None else min(_IDLE, interval / 4))
        exchange = ref()
        if exchange is None:
            return
        wait = exchange.waiting
        now = time.monotonic()
        if wait is not None and interval is not None and now - wait.logged >= interval:
            wait.logged = now
            try:
                exchange.warn(wait, now - wait.since)
            except Exception as exc:  # the watcher must never take the job down
                _log.debug("syncdeco's watcher could not report: %r", exc)
        del exchange, wait  # hold no exchange while asleep, so it can be collected
