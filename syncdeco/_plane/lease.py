"""Whether a node is still there: the rules of the node leases, with no I/O.

Every node of a job that spans several runs a pulse (``pulse.py``): a small
process of its own that renews its node's lease on the job's store every
:data:`PERIOD` seconds while any rank of the node lives.  It is a process,
not a thread of a rank, so that a rank holding the GIL in a long C call, or
a rank stopped by SIGSTOP, does not silence it; only the loss of the node
(power, kernel panic, a cut link), or the end of all its ranks, does.

A watcher (a thread of rank 0, and of one rank of another node, see
``nodewatch.py``) looks at every lease once a :data:`LOOK` and judges, with
:class:`Leases`, which nodes are lost: those whose lease has stood still for
:data:`LOST_AFTER` seconds of the watcher's own looks.

Why these numbers (the three false alarms a loss detector must survive):

* a link that drops every packet for 3 s: the pulse's renewal waits in TCP
  retransmission, whose backoff (0.2, 0.4, 0.8, 1.6, 3.2 s) can hold it up
  to about 6 s after the link heals; with a renewal every 1.5 s, a lease
  can stand still for about 7.7 s, under :data:`LOST_AFTER`;
* a rank holding the GIL, or stopped: the pulse is another process;
* the watcher itself stalled (its rank holds the GIL, or its own link
  dropped packets): a gap between two of its looks longer than
  :data:`STALL` means it saw nothing meanwhile, so it starts over instead
  of blaming the others.

A node lost at time t is named by t + LOST_AFTER + LOOK at the latest
(about 9 s), whatever the sync point's timeout.

A lease's value is what :func:`alive` or :func:`ended` make.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, final

__all__ = [
    "LOOK",
    "LOST_AFTER",
    "PERIOD",
    "STALL",
    "Leases",
    "Reading",
    "alive",
    "ended",
    "read",
]

PERIOD: Final = 1.5  # seconds between a pulse's renewals
LOOK: Final = 1.0  # seconds between a watcher's looks
LOST_AFTER: Final = 8.0  # seconds a lease may stand still before its node is lost
STALL: Final = 3.0  # a gap between two looks longer than this: the watcher stalled

_ENDED: Final = "ended"  # the count's place, once the node's ranks have all ended


def alive(count: int, host: str, ranks: Iterable[int]) -> bytes:
    """A renewal: a count that moves at every renewal, the node's host name
    and its ranks (so a watcher that finds the node lost can name them)."""
    return f"{count} {host} {_ranks(ranks)}".encode()


def ended(host: str, ranks: Iterable[int]) -> bytes:
    """What a pulse leaves when every rank of its node has ended, however
    (a rank that said it exits and one killed alike: the watcher reports
    them, and the job's store settles whether a rank had said so)."""
    return f"{_ENDED} {host} {_ranks(ranks)}".encode()


def _ranks(ranks: Iterable[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks)) or "-"


@final
@dataclass(frozen=True, slots=True)
class Reading:
    """A lease, read: the node's host, its ranks, and whether they have all
    ended (else the node is running)."""

    host: str
    ranks: tuple[int, ...]
    ended: bool


def read(value: bytes) -> Reading:
    """A lease's value, read."""
    count, host, ranks = value.decode().split(" ")
    return Reading(host, tuple(int(r) for r in ranks.split(",") if r != "-"), count == _ENDED)


@final
class Leases:
    """One watcher's memory of the leases it looked at, and its verdicts.

    Feed it every look with :meth:`look`; it answers with the nodes it
    judges lost at that look.  Plain values in, plain values out: the rules
    are tested without a store or a clock."""

    __slots__ = ("_last", "_since", "lost_after", "stall")

    def __init__(self, *, lost_after: float = LOST_AFTER, stall: float = STALL) -> None:
        self.lost_after = lost_after
        self.stall = stall
        self._since: dict[str, tuple[bytes, float]] = {}  # node -> (value, first seen at)
        self._last: float | None = None

    def look(self, now: float, values: Mapping[str, bytes | None]) -> list[str]:
        """Record a look that completed at ``now`` (the watcher's monotonic
        clock) and saw ``values`` (node -> its lease, None where there is
        none yet); return the nodes that are lost, in the order of
        ``values``.  A node whose lease says its ranks ended is never lost
        here (the watcher reads that itself); a node with no lease is not
        judged."""
        if self._last is not None and now - self._last > self.stall:
            self._since.clear()  # the watcher saw nothing meanwhile: start over
        self._last = now
        lost: list[str] = []
        for node, value in values.items():
            if value is None or value.startswith(_ENDED.encode()):
                self._since.pop(node, None)
                continue
            seen = self._since.get(node)
            if seen is None or seen[0] != value:
                self._since[node] = (value, now)
            elif now - seen[1] >= self.lost_after:
                lost.append(node)
        return lost

    def still(self, node: str, now: float) -> float | None:
        """For how long ``node``'s lease has stood still, as of ``now``
        (None: not judged)."""
        seen = self._since.get(node)
        return None if seen is None else now - seen[1]

    def forget(self, node: str) -> None:
        """Stop judging ``node`` (it was reported lost)."""
        self._since.pop(node, None)
