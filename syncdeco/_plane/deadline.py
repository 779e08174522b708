"""How long a sync point waits, as one value.

A :class:`Deadline` holds when a wait ends (``time.monotonic()``; None:
never) and the sync point's own timeout (for messages, and for the grace
a member adds for each tier above it).  The arithmetic lives here, pure:
what a member waits beyond its main (:meth:`Deadline.extended`), when a
node's main stops gathering its ranks (:meth:`Deadline.early`), and the
deadline as wall-clock time for a frame that crosses hosts
(:meth:`Deadline.wall`); and :func:`look_until`, the one loop that looks
for something at growing intervals.  No store, no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, NamedTuple, final

__all__ = ["GRACE", "STACK_WAIT", "WITHDRAW_MARGIN", "Deadline", "look_until"]

GRACE: Final = 1.0  # extra seconds a member waits for the main's verdict, per tier
STACK_WAIT: Final = 1.0  # seconds a timed-out sync point waits for the missing ranks' stacks
WITHDRAW_MARGIN: Final = 1.0  # seconds before a member's deadline to look for its withdrawal


@final
class Deadline(NamedTuple):
    """When a wait ends (``at``, monotonic; None: never), for a sync point
    whose timeout is ``timeout`` seconds (None: none).  (A named tuple: every
    rank makes one at every sync point, and a frozen dataclass's init costs
    a few times more.)"""

    at: float | None
    timeout: float | None

    @classmethod
    def after(cls, timeout: float | None, now: float | None = None) -> Deadline:
        """``timeout`` seconds from ``now`` (None: from this moment)."""
        if timeout is None:
            return NEVER
        return cls((time.monotonic() if now is None else now) + timeout, timeout)

    def left(self, now: float | None = None) -> float | None:
        """Seconds left (never below 0), or None for a wait without end."""
        if self.at is None:
            return None
        return max(0.0, self.at - (time.monotonic() if now is None else now))

    def passed(self, now: float | None = None) -> bool:
        return self.at is not None and (time.monotonic() if now is None else now) >= self.at

    def extended(self, tiers: int) -> Deadline:
        """A member's deadline, ``tiers`` levels below the main that judges
        its sync point: a little longer than its main's (and the second the
        main takes to ask the missing ranks where they are), once for each
        tier above it, so that when another rank is missing it hears so
        from the main, which knows who, instead of blaming the rank it
        waits for."""
        if self.at is None or self.timeout is None or tiers <= 0:
            return self
        extra = _grace(self.timeout) + STACK_WAIT
        return Deadline(self.at + tiers * extra, self.timeout)

    def then(self, now: float | None = None) -> Deadline:
        """The deadline of what follows a verdict (a result's tensors, which
        the main sends only once it answered, for as long as they take on
        its side): the sync point's timeout again, from ``now``."""
        return Deadline.after(self.timeout, now)

    def early(self) -> Deadline:
        """A node's main stops gathering its ranks' frames a little before
        rank 0's deadline, so that rank 0 hears which of the node's ranks
        are missing, not that the node is."""
        if self.at is None or self.timeout is None:
            return self
        return Deadline(self.at - min(GRACE, self.timeout / 4), self.timeout)

    def wall(self, now: float | None = None, wall_now: float | None = None) -> float | None:
        """This deadline as wall-clock time (frames cross hosts)."""
        if self.at is None:
            return None
        now = time.monotonic() if now is None else now
        return (time.time() if wall_now is None else wall_now) + (self.at - now)


def _grace(timeout: float) -> float:
    """A tier's grace: a tenth of the timeout, between 1 and 10 seconds."""
    return min(max(GRACE, 0.1 * timeout), 10 * GRACE)


NEVER: Final = Deadline(None, None)


def look_until(done: Callable[[], object], seconds: float, *, first: float, most: float) -> bool:
    """Call ``done`` until it is true (then True) or ``seconds`` have passed
    (then False), sleeping ``first`` seconds after the first look and twice
    as long after each next one, ``most`` at most.  For looks at a store
    that must not be store waits: a wait that times out makes torch's store
    client log."""
    until = time.monotonic() + seconds
    pause = first
    while not done():
        left = until - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(2 * pause, most)
    return True
