"""Nodes watching nodes: the pulses of a job that spans several nodes, and
the watchers that read them (the rules are in ``lease.py``).

* every node's main starts its node's pulse (``pulse.py``) and hands it the
  pids of its node's ranks as it learns them;
* rank 0 watches every other node's lease; under torchrun, whose agent may
  host the job's store on another node than rank 0's, so does the main of
  one more node (the mains of the two nodes whose mains have the lowest
  ranks watch), so that a lost rank 0 is named too.  Where rank 0 hosts the
  store, its loss is the store's, which every rank's keepalive tells.  Each reads
  every lease in one request a look.  Every node's main starts as a
  watcher and stops as soon as the list of pulses shows two nodes whose
  mains have lower ranks than its own: a few looks at startup.

A watcher that finds a node lost, or a pulse that says its node's ranks
all ended, hands a :class:`Failure` per rank to ``report``, which tells the
ranks that wait for them (at once inside a sync point, else at the next).
A watcher never decides a job's fate alone: what it reports is an exit, as
a rank's own or a sibling's report would be, and the job's store settles
who says it first.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final

from .._backend import Failure
from . import lease
from .exits import killed_failure
from .pulse import LIST, lease_key

__all__ = ["NodeWatch", "lost_failure"]

_log = logging.getLogger("syncdeco")

_OVERDUE: Final = lease.PERIOD + 1.0  # seconds a lease may stand still in the normal course
_EARLY: Final = 10  # looks that each read the list of nodes (while pulses start)
_RELIST: Final = 5  # looks between two readings of it after those


def lost_failure(rank: int, host: str, ranks: Iterable[int]) -> Failure:
    """How the loss of ``rank``'s node (on ``host``, with ``ranks``) travels."""
    return Failure(
        rank, "", "", "", exited=True, killed=True, lost_host=host, lost_ranks=tuple(ranks)
    )


class NodeWatch:
    """A watcher of the other nodes' leases: one daemon thread, with a store
    connection of its own, until :meth:`close` or the end of the process."""

    __slots__ = (
        "__weakref__",
        "_lock",
        "_node",
        "_rank",
        "_report",
        "_state",
        "_stop",
        "_store",
        "thread",
    )

    def __init__(
        self,
        store: Any,
        node: str,
        rank: int,
        report: Callable[[list[Failure]], None],
    ) -> None:
        """Watch the other nodes from ``node`` (its main is ``rank``), over
        ``store``, a connection of its own to the job's store under the
        pulses' namespace; ``report`` is called in the watcher's thread."""
        self._store = store
        self._node = node
        self._rank = rank
        self._report = report
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = _State()
        self.thread = threading.Thread(
            target=_run, args=(weakref.ref(self),), name="syncdeco-nodewatch", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop.set()

    def overdue(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s node where its lease is overdue (it has
        stood still for longer than a renewal takes: the node may be lost,
        and is judged so within seconds), else ()."""
        with self._lock:
            state, now = self._state, time.monotonic()
            for node, (_, ranks) in state.ranks.items():
                if rank in ranks:
                    still = state.leases.still(node, now)
                    late = node in state.lost or (still is not None and still > _OVERDUE)
                    return ranks if late else ()
        return ()

    def over(self) -> set[str]:
        """The nodes reported (lost, or their ranks all ended): their
        pulses hear no mark (see ``pulse.linger``)."""
        with self._lock:
            return set(self._state.over)

    # In the watcher's thread:

    def _look(self) -> bool:
        """One look; False once this rank need not watch."""
        store, state = self._store, self._state
        if state.looks < _EARLY or state.looks % _RELIST == 0:
            listing = bytes(store.compare_set(LIST, "", "")).decode()  # no wait, one request
            mains = dict(entry.rsplit(" ", 1) for entry in listing.split("\n") if entry)
            below = [n for n, r in mains.items() if int(r) < self._rank]
            if len(below) >= 2:
                return False  # two nodes whose mains rank lower watch
            state.nodes = [n for n in mains if n != self._node]
        state.looks += 1
        nodes = [n for n in state.nodes if n not in state.over]
        if not nodes:
            return True
        values = [bytes(v) for v in store.multi_get([lease_key(n) for n in nodes])]
        now = time.monotonic()
        running: dict[str, bytes] = {}
        failures: list[Failure] = []
        with self._lock:
            for node, value in zip(nodes, values, strict=True):
                reading = lease.read(value)
                state.ranks[node] = (reading.host, reading.ranks)
                if reading.ended:
                    state.over.add(node)
                    # A rank that said it exits is not reported: the job's
                    # store settles that (see exits.say_exit).
                    failures += [killed_failure(r) for r in reading.ranks]
                else:
                    running[node] = value
            for node in state.leases.look(now, running):
                reading = lease.read(running[node])
                state.over.add(node)
                state.lost.add(node)
                _log.debug("syncdeco: node %s (%s) lost", node, reading.host)
                failures += [lost_failure(r, reading.host, reading.ranks) for r in reading.ranks]
        if failures:
            self._report(failures)
        return True


class _State:
    __slots__ = ("leases", "looks", "lost", "nodes", "over", "ranks")

    def __init__(self) -> None:
        self.leases = lease.Leases()
        self.looks = 0
        self.nodes: list[str] = []
        self.over: set[str] = set()  # nodes reported (lost, or their ranks ended)
        self.lost: set[str] = set()  # ... lost
        self.ranks: dict[str, tuple[str, tuple[int, ...]]] = {}  # node -> (host, ranks)


def _run(ref: weakref.ref[NodeWatch]) -> None:
    while True:
        watch = ref()
        if watch is None:
            return
        stop = watch._stop
        del watch
        if stop.wait(lease.LOOK):
            return
        watch = ref()
        if watch is None:
            return
        try:
            if not watch._look():
                return
        except Exception as exc:  # the store is gone: its loss is the sync points' to report
            _log.debug("syncdeco: the node watch stopped: %r", exc)
            return
        del watch
