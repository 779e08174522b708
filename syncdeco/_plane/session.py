"""One process group's sync plane in this process: a :class:`Session`.

A session owns the :class:`Exchange` over its job's store (the process
group's, or the launcher's before the group exists) and everything that
serves it from other threads or processes:

* the stack responder, which answers a timed-out sync point's question
  "where is this rank's main thread?" (see ``stacks``);
* the death watch of this node's other ranks (see ``deathwatch``), fed by a
  finder thread that looks for them as each says where it lives;
* on a node's main, in a job that spans several nodes: the node's pulse
  (a forked process, see ``pulse``), a thread that hears from it the
  job's loss mark, and the watch of the other nodes' leases
  (see ``nodewatch``);
* the store watch, an idle canary connection that notices the loss of the
  store's host (see ``keepalive``);
* the ranks those watches see end or lost, reported once each
  (:meth:`Session.on_loss`, the one place that acts on them);
* this rank's exit notice (:meth:`Session.leave`), and, on the rank that
  hosts the job's store, the end of the others' responders at exit.

Nothing starts when a session is made: :meth:`Session.start` starts it all
(the pulse first, as it is forked before this session starts a thread);
:meth:`Session.close` stops it all when another session replaces this one;
:meth:`Session.stop` ends, at interpreter exit, the threads that may be
inside a store call.  Which session a sync point uses is ``group``'s to say.
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
import weakref
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final, final

import torch.distributed as dist

from .. import _startup as startup
from .._backend import Failure
from . import exits, failfast, pulse
from .deadline import look_until
from .deathwatch import DeathWatch, identity, watchable
from .exchange import Exchange, Place
from .keepalive import StoreWatch, endpoint, keep_alive, underlying
from .nodewatch import NodeWatch
from .stacks import StackResponder, end_responders, sync_state

__all__ = ["Loss", "Session"]

_log = logging.getLogger("syncdeco")

# A rank seen to end, and, for a rank of another node, that node's ranks
# (None: a rank of this node).
Loss = tuple[Failure, tuple[int, ...] | None]

_WATCH_TIMEOUT: Final = 60.0  # seconds a look at the leases may take (it never waits)
_FIND_FIRST: Final = 0.01  # seconds between the first looks for the node's ranks
_FIND_MOST: Final = 5.0  # ... and the longest, while some have not started yet
_GROUP_WAIT: Final = 5.0  # seconds a rank's exit waits for the others' group to be up
_JOIN: Final = 2.0  # seconds stop() waits for a thread to leave its store call
_LINGER: Final = 2.0  # seconds the store's host waits, at most, for the pulses to hear a loss


@final
class Session:
    """This process's side of one process group (or of the launcher's store
    that will carry one): its exchange and the threads that serve it."""

    __slots__ = (
        "__weakref__",
        "death_watch",
        "deaths",
        "env",
        "exchange",
        "finder",
        "group_up",
        "hosts_store",
        "look",
        "looking",
        "node_watch",
        "pulse",
        "responder",
        "stopping",
        "store_watch",
    )

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        place: Place,
        env: Mapping[str, str],
        **options: Any,
    ) -> None:
        """An exchange over ``store`` (a connection of its own; see
        :class:`Exchange` for ``options``), for the job ``env`` describes.
        Starts nothing (see :meth:`start`)."""
        ref = weakref.ref(self)
        self.exchange = Exchange(
            store, rank, world_size, place, overdue=functools.partial(_overdue, ref), **options
        )
        self.env = env
        # Ranks seen to end, not yet reported (a list: appends are atomic).
        self.deaths: list[Loss] = []
        self.stopping = threading.Event()  # set once this session's threads are to end
        # The finder looks again at once when this is set: by the first sync
        # point to succeed (every rank of the node has registered by then),
        # or when the session stops.  ``looking``: while the finder runs.
        self.look = threading.Event()
        self.looking = False
        # The key each rank adds to once the group this session's first sync
        # point made is up here (None: the session made no group).
        self.group_up: str | None = None
        self.responder: StackResponder | None = None
        self.death_watch: DeathWatch | None = None  # the processes of this node's other ranks
        self.finder: threading.Thread | None = None  # ... looked for by this thread
        self.pulse: pulse.Pulse | None = None  # this node's pulse, on a node's main
        self.node_watch: NodeWatch | None = None  # the watch of the other nodes' leases
        self.store_watch: StoreWatch | None = None  # the watch of the job's store's host
        # Whether this process hosts the job's store (rank 0, unless
        # torchrun's agent does): the other ranks' responders end with it.
        self.hosts_store = (
            rank == 0 and world_size > 1 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        )

    # -- starting and stopping -------------------------------------------------

    def start(self, previous: Session | None = None) -> None:
        """Say where this rank lives and start serving the exchange.
        ``previous``: the session this one replaces, closed here (its store
        watch is kept where the store is the same)."""
        made = self.exchange
        made.store.set(f"{made.prefix}/pid/{made.rank}", pickle.dumps(identity()))
        failfast.arm(
            made.rank, f"{endpoint(made.store)} {startup.namespace(self.env)}", identity()[0]
        )
        if previous is not None:
            previous.close()
            self.store_watch = previous.store_watch
        self._start_pulse()  # forked: before this session starts any thread
        # Answers a timed-out sync point's question: where is this rank's
        # main thread?  Its own connection, idle until asked, on every rank.
        # A connection idle in a wait on rank 0's store would make the store
        # client log an error when rank 0 ends first, as correct programs
        # do: so where rank 0 hosts the store (not torchrun's agent, which
        # outlives the ranks), rank 0 stops every responder at its exit,
        # before its store goes (see end_responders).
        self.responder = StackResponder(
            made.spare.clone(),
            f"{made.prefix}/stack",
            made.rank,
            ring=made.spare.clone(),
            world_size=made.world_size,
            sync=functools.partial(sync_state, weakref.ref(made)),
        )
        self.responder.start()
        self.death_watch = DeathWatch(functools.partial(_ended, weakref.ref(self)))
        self.finder = threading.Thread(
            target=_find_node,
            args=(weakref.ref(self), made.spare.clone()),
            name="syncdeco-find-node",
            daemon=True,
        )
        self.looking = True
        self.finder.start()
        exits.note_uncaught()
        self._watch_nodes()
        if self.pulse is not None:
            threading.Thread(
                target=_hear,
                args=(weakref.ref(self), self.pulse),
                name="syncdeco-pulse-news",
                daemon=True,
            ).start()

    def close(self) -> None:
        """Stop serving: another session replaces this one.  Never waits
        for a thread in a store call (each ends at its next wake)."""
        self.stopping.set()
        self.look.set()
        if self.responder is not None:
            self.responder.close()
        if self.pulse is not None:
            self.pulse.close()
        if self.node_watch is not None:
            self.node_watch.close()
        if self.death_watch is not None:
            self.death_watch.close()

    def stop(self) -> None:
        """At interpreter exit, before the exit notice: end the threads that
        may use the store (a daemon thread inside a store call when the
        interpreter tears down aborts the process: "terminate called without
        an active exception")."""
        self.stopping.set()
        self.look.set()
        if self.death_watch is not None:
            self.death_watch.close()
        here = threading.current_thread()
        watch = self.node_watch
        if watch is not None:
            watch.close()
            if watch.thread.is_alive() and watch.thread is not here:
                watch.thread.join(timeout=_JOIN)  # out of any store call before teardown
        finder = self.finder
        if finder is not None and finder is not here and finder.is_alive():
            finder.join(timeout=_JOIN)

    def end_responders(self) -> None:
        """At interpreter exit, where this process hosts the job's store:
        stop the other ranks' stack responders (2 s at most) before the
        store ends with this process, so that none is left in a wait on it
        (see ``stacks.end_responders``)."""
        made = self.exchange
        if not self.hosts_store or made.spare is None:
            return
        try:
            late = end_responders(
                made.spare.clone(), f"{made.prefix}/stack", skip={made.rank, *made.gone}
            )
            if late:
                _log.debug("the stack responders of ranks %s did not stop in time", late)
        except Exception as exc:
            _log.debug("rank %d could not stop the others' stack responders: %r", made.rank, exc)

    def _spans(self) -> bool:
        """Whether this rank's job spans several nodes, as its launcher says."""
        size = self.exchange.place.local_size
        return size is not None and size < self.exchange.world_size

    def _start_pulse(self) -> None:
        """On a node's main, in a job that spans several nodes: this node's
        pulse (see ``pulse``), fed the pids of the node's ranks by the finder."""
        made = self.exchange
        at = endpoint(made.store)
        if at is None or not self._spans() or made.place.local_rank != 0:
            return
        namespace = startup.namespace(self.env)
        try:
            self.pulse = pulse.start(*at, namespace, made.place.node, made.rank)
        except OSError as exc:
            _log.debug("rank %d could not start its node's pulse: %r", made.rank, exc)

    def _watch_nodes(self) -> None:
        """Make this rank's connections to the job's store notice the loss
        of its host (``keepalive``); in a job that spans several nodes, on a
        node's main, watch the other nodes (see ``nodewatch``)."""
        made = self.exchange
        at = endpoint(made.store)
        if at is None:
            return  # not a TCP store: nothing to tune, nowhere to renew a lease
        kept = self.store_watch
        if kept is not None and (kept.host, kept.port) == at:
            kept.on_lost = functools.partial(_store_lost, weakref.ref(self))  # now this one's
        else:
            try:
                self.store_watch = StoreWatch(*at, made.store)
                self.store_watch.on_lost = functools.partial(_store_lost, weakref.ref(self))
                self.store_watch.start()
            except Exception as exc:
                _log.debug("rank %d could not watch the store's host: %r", made.rank, exc)
        keep_alive(*at)
        if not self._spans() or made.place.local_rank != 0:
            return
        if made.rank != 0 and self.env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # Rank 0 hosts the job's store: if its node is lost, the store is
            # too, which every rank's keepalive tells; and a watcher here would
            # use the store after rank 0 ended, which makes torch's client log.
            return
        try:
            # A connection of its own (a clone: a new client would make torch log).
            raw = underlying(made.store).clone()
            raw.set_timeout(timedelta(seconds=_WATCH_TIMEOUT))  # a clone has its source's timeout
            store = dist.PrefixStore(startup.namespace(self.env), raw)  # type: ignore[attr-defined]
            keep_alive(*at)
            watch = NodeWatch(
                store, made.place.node, made.rank, functools.partial(_lost, weakref.ref(self))
            )
        except Exception as exc:
            _log.debug("rank %d could not start watching the other nodes: %r", made.rank, exc)
            return
        self.node_watch = watch
        watch.start()

    # -- the group this session made ----------------------------------------------

    def made_group(self) -> None:
        """The default group, made at this session's first sync point, is
        up on this rank: say so (one request, once per job)."""
        made = self.exchange
        self.group_up = f"{made.prefix}/group_up"
        made.store.add(self.group_up, 1)

    def await_group(self) -> None:
        """At interpreter exit, on a rank whose first sync point made the
        group: wait until every rank has it up (:data:`_GROUP_WAIT` at most).
        Gloo connects a pair of ranks one side before the other: a rank that
        exits at once (a program with one sync point) would close its side
        while the other still reads it ("Connection closed by peer")."""
        made = self.exchange
        if self.group_up is None or made.world_size < 2:
            return
        up, store = self.group_up, made.spare
        try:
            look_until(
                lambda: int(store.add(up, 0)) >= made.world_size,
                _GROUP_WAIT,
                first=_FIND_FIRST,
                most=0.2,
            )
        except Exception as exc:  # the store has gone: nothing to wait for
            _log.debug("rank %d did not wait for the group: %r", made.rank, exc)

    # -- ranks seen to end -----------------------------------------------------

    def seen(self, losses: list[Loss]) -> None:
        """In a watch's thread: ranks seen to end, or lost with their node.
        Noted for the next sync point, then :meth:`on_loss`."""
        made = self.exchange
        if made.left or self.stopping.is_set():
            return  # a rank that said it is leaving reports nothing more (its node's others do)
        self.deaths.extend(losses)
        in_sync_point = made.waiting is not None or made.lock.locked()
        self.on_loss(losses, in_sync_point=in_sync_point)

    def on_loss(self, losses: list[Loss], *, in_sync_point: bool) -> None:
        """The one place that acts on ranks seen to end: a rank of this node,
        through the death watch (``(failure, None)``), or ranks of another
        node that ended or were lost with it, through the node watch
        (``(failure, that node's ranks)``).  Called in that watch's thread,
        ``losses`` already noted in :attr:`deaths`; not called once this
        rank has said it is leaving, or at interpreter exit.

        Inside a sync point the others are told at once (:meth:`tell`).
        Outside one, fail-fast (on by default) ends this rank (see
        ``failfast``); with it off, the others are told at this rank's next
        sync point (``TorchBackend.sync``): never from a rank that is not
        using the store (at the end of a job whose store host has gone, that
        would make the store client log)."""
        if in_sync_point:
            self.tell()
            return
        # Elsewhere (its own collective, computing, loading data): with
        # fail-fast on, end this rank (see failfast); but not for a rank whose
        # end a sync point has already raised here (the others told it first,
        # and the program has had its say).
        known = self.exchange.gone
        here = [f for f, elsewhere in losses if elsewhere is None and f.rank not in known]
        there = [f for f, elsewhere in losses if elsewhere is not None and f.rank not in known]
        for failure in here:
            failfast.peer_ended(failure.rank, self.spread)
        if there:
            made = self.exchange
            store = made.spare or made.store
            failfast.nodes_lost(failfast.not_said(there, store, made.prefix), self.spread)

    def marked(self, note: bytes) -> None:
        """In the pulse's news thread, on a node's main: the pulse heard
        the job's loss mark (a rank's fail-fast note).  A sync
        point hears of it from the store; elsewhere, fail-fast ends this
        rank, and its node's other ranks after it."""
        made = self.exchange
        if made.left or self.stopping.is_set() or made.waiting is not None or made.lock.locked():
            return
        failfast.told_by_pulse(note, self.spread)

    def spread(self, note: bytes, *, report: bool, mark: bool) -> None:
        """As this rank ends through fail-fast (``note``: its note): report
        the ranks seen to end (``report``); in a job that spans several
        nodes, write the job's loss mark, which every node's pulse waits
        for (``mark``, see ``pulse.mark``); and where the job's store ends
        with this rank (see :meth:`_store_ends_here`), wait until every
        running node's pulse has heard it."""
        if report:
            self.tell()
        linger = self._store_ends_here()
        if not self._spans() or not (mark or linger):
            return
        made = self.exchange
        try:
            raw = underlying(made.spare or made.store)
            store = dist.PrefixStore(startup.namespace(self.env), raw)  # type: ignore[attr-defined]
            if mark:
                first = pulse.mark(store, note)
                _log.debug("rank %d wrote the loss mark (first: %s)", made.rank, first)
            skip = {made.place.node}
            if self.node_watch is not None:
                skip |= self.node_watch.over()
            if linger and not pulse.linger(store, skip, _LINGER, failfast.lost_in(note)):
                _log.debug("rank %d ends before every pulse heard the mark", made.rank)
        except Exception as exc:
            _log.debug("rank %d could not write the loss mark: %r", made.rank, exc)

    def store_lost(self, host: str) -> None:
        """In the store watch's thread: the job's store's host went silent.
        A sync point reports it; elsewhere, fail-fast may end this rank."""
        made = self.exchange
        if made.left or self.stopping.is_set():
            return
        if made.waiting is not None or made.lock.locked():
            return  # the sync point reports it
        agent = self.env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        failfast.store_host_lost(host, () if agent else (0,))

    def _store_ends_here(self) -> bool:
        """Whether the job's store ends soon after this rank does: it hosts
        the store, or, under torchrun, its node's agent does (the agent of
        group rank 0), which ends its workers and itself, with its store,
        once one fails and no restart is left."""
        if self.hosts_store:
            return True
        env = self.env
        return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("GROUP_RANK") == "0"

    def tell(self) -> None:
        """Tell the others now of the ranks seen to end (from any thread:
        on the exchange's spare connection, as a sync point may hold its own)."""
        made = self.exchange
        self.report_deaths(made.spare or made.store)

    def report_deaths(self, store: Any) -> None:
        """Tell the others of the ranks seen to end (once each:
        ``report_killed`` settles who reports it first).  A store that cannot
        be reached (its host was the rank that ended) is left for the sync
        point to report."""
        made = self.exchange
        while True:
            try:  # (several threads may report: each takes its own)
                loss = self.deaths.pop()
            except IndexError:
                return
            failure, elsewhere = loss
            try:
                told = made.report_killed(failure, store, elsewhere=elsewhere)
                _log.debug("rank %d reported rank %d's end: %s", made.rank, failure.rank, told)
            except Exception as exc:
                _log.debug(
                    "rank %d could not report rank %d's end: %r", made.rank, failure.rank, exc
                )
                self.deaths.append(loss)  # for the sync point to report
                return

    def overdue(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s node where its lease is overdue (see
        ``nodewatch``), else ()."""
        watch = self.node_watch
        return () if watch is None else watch.overdue(rank)

    # -- this rank's exit ------------------------------------------------------

    def leave(self, exc: BaseException | None) -> None:
        """Tell the others that this rank's process is ending (``exc``: the
        exception that ends it, if any; see ``Exchange.leave``)."""
        self.exchange.leave(exits.exit_failure(self.exchange.rank, exc))


# Called from the watches' threads with a weak reference, so that a session
# no longer used is not kept alive by its own threads.


def _overdue(ref: weakref.ref[Session], rank: int) -> tuple[int, ...]:
    session = ref()
    return () if session is None else session.overdue(rank)


def _ended(ref: weakref.ref[Session], rank: int) -> None:
    # In the death watch's thread: a rank of this node ended.
    session = ref()
    if session is not None:
        _log.debug("rank %d saw rank %d's process end", session.exchange.rank, rank)
        session.seen([(exits.killed_failure(rank), None)])


def _store_lost(ref: weakref.ref[Session], host: str) -> None:
    # In the store watch's thread.
    session = ref()
    if session is not None:
        session.store_lost(host)


def _lost(ref: weakref.ref[Session], failures: list[Failure]) -> None:
    # In the node watch's thread: ranks of other nodes that ended, or whose
    # node was lost.
    session = ref()
    if session is not None:
        session.seen([(f, f.lost_ranks or (f.rank,)) for f in failures])


def _hear(ref: weakref.ref[Session], handle: pulse.Pulse) -> None:
    # The pulse's news thread, on a node's main (see Session.marked).
    def told(note: bytes) -> None:
        session = ref()
        if session is not None:
            session.marked(note)

    handle.hear(told)


def _find_node(ref: weakref.ref[Session], store: Any) -> None:
    """Watch the processes of this node's other ranks through the kernel
    (see ``deathwatch``), as each says where it lives.  Runs in a thread of
    its own from the moment this rank joins, on a connection of its own:
    it looks for the node's ranks with backing-off checks (never a store
    wait that could time out, which makes torch log), about once every 5 s
    at most while one is slow to start."""
    pause = _FIND_FIRST
    pending: set[int] | None = None  # the node's other ranks not watched yet
    try:
        _find(ref, store, pause, pending)
    finally:
        session = ref()
        if session is not None:
            session.looking = False


def _find(ref: weakref.ref[Session], store: Any, pause: float, pending: set[int] | None) -> None:
    while pending is None or pending:
        session = ref()
        if session is None or session.exchange.left or session.stopping.is_set():
            return
        made, watch, look = session.exchange, session.death_watch, session.look
        # Every rank of the node has joined once a sync point succeeded
        # here: a rank that has not registered by then never will.
        last = made.met
        try:
            if pending is None:
                pending = _node_ranks(made, store)
            if pending:
                keys = [f"{made.prefix}/pid/{r}" for r in sorted(pending)]
                here = [r for r, k in zip(sorted(pending), keys, strict=True) if store.check([k])]
                found = store.multi_get([f"{made.prefix}/pid/{r}" for r in here]) if here else []
                found_at = {r: pickle.loads(v) for r, v in zip(here, found, strict=True)}
                near = watchable(identity(), found_at)
                if watch is not None:
                    for rank, pid in near.items():
                        failfast.watching(rank, pid)  # first: a rank gone is reported at once
                        watch.watch(rank, pid)
                if session.pulse is not None:
                    session.pulse.serve(near)
                pending -= set(here)
        except Exception as exc:
            _log.debug("rank %d stopped looking for its node's ranks: %r", made.rank, exc)
            return  # the store has gone: nothing to report to
        if last:
            return  # that was the last look
        del session, made, watch
        look.wait(pause)  # a sync point met, or the session stopping, wakes it
        pause = min(2 * pause, _FIND_MOST)


def _node_ranks(made: Exchange, store: Any) -> set[int] | None:
    """The other ranks of this rank's node, once all of them are known."""
    prefix, place = made.prefix, made.place
    if place.local_size is not None:
        keys = [f"{prefix}/node/{place.node}/{lr}" for lr in range(place.local_size)]
        if not store.check(keys):
            return None
        ranks = [int(v) for v in store.multi_get(keys)]
    else:
        keys = [f"{prefix}/topo/{r}" for r in range(made.world_size)]
        if not store.check(keys):
            return None
        topo = store.multi_get(keys)
        ranks = [r for r, v in enumerate(topo) if pickle.loads(v)[0] == place.node]
    return {r for r in ranks if r != made.rank}
