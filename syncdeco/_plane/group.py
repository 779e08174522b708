"""The process group's lifecycle, as syncdeco sees it.

* which group a sync point uses, and the :class:`Exchange` over its store;
* before any group exists, an exchange over the launcher's store (see
  ``syncdeco._startup``) that makes the group once every rank has met;
* remembering a destroyed group's rank facts;
* forgetting everything in a forked child;
* telling the others, at interpreter exit, that this rank is gone.

Whether the sync plane is used at all is decided in ``syncdeco._select``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import pickle
import threading
import weakref
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

import torch
import torch.distributed as dist

from .. import _startup as startup
from .._backend import Failure, SyncPoint
from .._env import Launch, detect_launch, local_rank_from_env, local_world_size_from_env, node_key
from .._errors import SyncError, SyncTimeoutError
from . import exits, pulse, wire
from .deathwatch import DeathWatch, identity, watchable
from .exchange import Exchange, Place
from .keepalive import StoreWatch, endpoint, keep_alive, underlying
from .nodewatch import NodeWatch
from .stacks import StackResponder, end_responders, sync_state

__all__ = [
    "announce_exit",
    "early_exchange",
    "exchange",
    "exchange_for",
    "exit_notice",
    "launched",
    "refuse_destroyed",
]

DISTRIBUTED: Final = dist.is_available()
_log = logging.getLogger("syncdeco")

_lock = threading.Lock()
# The exchange over the default group's store, and that group (weakly: a
# strong reference would keep the group alive after destroy_process_group(),
# until interpreter teardown, where Gloo's threads abort the process).
_current: tuple[weakref.ref[Any], Exchange] | None = None
# The exchange over the launcher's store, while the group it will make does
# not exist yet (see early_exchange).
_early: Exchange | None = None

# The last default group this process saw, with its rank and world size
# there: after destroy_process_group() they are still its rank facts, and a
# sync point raises instead of finding no group and running alone on the
# Null backend.
last_group: tuple[weakref.ref[Any], int, int] | None = None
_forked_child = False  # forked from a process with a group (see _forget_in_child)
_responder: StackResponder | None = None
# The exchange over the job's store where this process hosts it (rank 0,
# unless torchrun's agent does): its other ranks' responders end with it.
_store_host: weakref.ref[Exchange] | None = None

# Whether the environment describes a multi-rank job, read once per process
# (a launcher sets it before the process starts); init() and reset() forget it.
_launched: list[bool] = []


def remember_group() -> None:
    global last_group
    group = dist.distributed_c10d._get_default_group()
    if last_group is None or last_group[0]() is not group:
        last_group = (weakref.ref(group), dist.get_rank(), dist.get_world_size())


def launch_of(env: Mapping[str, str]) -> Launch:
    launch = detect_launch(env)
    if launch is None:
        raise SyncError(
            "TorchBackend has no process group: torch.distributed is not "
            "initialised and no launcher environment (RANK/WORLD_SIZE from "
            "torchrun, SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_RANK/SIZE) "
            "was found. Launch with torchrun, call "
            "torch.distributed.init_process_group() first, or use NullBackend()."
        )
    return launch


def refuse_destroyed(point: SyncPoint | None) -> None:
    """Raise ``SyncError`` if this process's group has been destroyed."""
    if last_group is not None:
        where = f"at {point.describe()}" if point is not None else "before a sync point"
        raise SyncError(
            f"rank {last_group[1]} {where}: the process group this process used has "
            f"been destroyed (torch.distributed.destroy_process_group()), so no sync "
            f"point can be reached. Move sync points before the teardown, or "
            f"call init_process_group() again first."
        )


def exchange_for(
    backend: str | None, env: Mapping[str, str], point: SyncPoint | None, timeout: float | None
) -> Exchange:
    """The exchange for a sync point: over the default group's store, or,
    before any group exists, over the launcher's store (reached within
    ``timeout`` seconds; None: forever), which makes the group (with
    ``backend``) once every rank has met at a world sync point."""
    if dist.is_initialized():
        return exchange(env)
    refuse_destroyed(point)
    return early_exchange(backend, env, point, timeout)


def early_exchange(
    backend: str | None, env: Mapping[str, str], point: SyncPoint | None, timeout: float | None
) -> Exchange:
    """The exchange over the launcher's store, before the group exists
    (opened on first call).  Sync traffic needs only the store: the first
    sync point keeps every promise the later ones keep, and no rank waits in
    torch's rendezvous, which has a timeout of its own and names nobody."""
    global _early
    made = _early
    if made is not None:
        return made
    launch = launch_of(env)
    name = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    try:
        job = startup.open_store(launch, env, timeout)
    except startup.StoreUnreachable as exc:
        raise _unreachable(exc, launch, point, timeout) from exc.cause
    if name == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    with _lock:
        if _early is None:
            made = _new_exchange(
                job.store.clone(),  # a connection of the exchange's own
                launch.rank,
                launch.world_size,
                env,
                spare=job.store,
                wire_device=functools.partial(wire.wire_device, name),
            )
            made.on_met = functools.partial(_make_group, weakref.ref(made), job, name)
            _early = made
        return _early


def _make_group(ref: weakref.ref[Exchange], job: startup.JobStore, backend: str) -> None:
    """Every rank has just met at a world sync point where all is well: make
    the default group over the job's store (Gloo's rendezvous is quick, as
    every rank is on its way to it) and carry on with the same exchange."""
    global _current, _early
    made = ref()
    if made is None:
        return
    if not dist.is_initialized():  # else the program made one meanwhile: use it
        dist.init_process_group(
            backend, store=job.group_store(), rank=made.rank, world_size=made.world_size
        )
    group = dist.distributed_c10d._get_default_group()
    with _lock:
        _current = (weakref.ref(group), made)
        _early = None
    made.on_met = None
    made.wire_device = wire.wire_device
    remember_group()


def _unreachable(
    exc: startup.StoreUnreachable, launch: Launch, point: SyncPoint | None, timeout: float | None
) -> SyncError:
    """What a rank says when it cannot reach the job's store in time."""
    where = point.describe() if point is not None else "its first sync point"
    if exc.store.startswith("rank 0"):
        return SyncTimeoutError(
            missing=(0,),
            point=f"{where} [{exc.store}, and did not let rank {launch.rank} connect: "
            f"rank 0 has not started yet, or has exited]",
            timeout=timeout or 0.0,
            observer=launch.rank,
            last_seen={0: None},
        )
    return SyncError(
        f"rank {launch.rank} at {where} could not reach the job's store within "
        f"{exc.waited:g}s: {exc.store}, and did not let it connect ({exc.cause}). "
        f"The launcher's agent may have exited, or MASTER_ADDR/MASTER_PORT do not "
        f"point at it."
    )


def _place(env: Mapping[str, str], rank: int) -> Place:
    local = local_rank_from_env(env)
    return Place(node_key(env), rank if local is None else local, local_world_size_from_env(env))


def _new_exchange(
    store: Any, rank: int, world_size: int, env: Mapping[str, str], **options: Any
) -> Exchange:
    global _responder
    made = Exchange(store, rank, world_size, _place(env, rank), overdue=_overdue, **options)
    made.store.set(f"{made.prefix}/pid/{rank}", pickle.dumps(identity()))
    _start_pulse(made, env)  # forked: before this function starts any thread
    # Answers a timed-out sync point's question: where is this rank's main
    # thread?  Its own connection, idle until asked, on every rank.  A
    # connection idle in a wait on rank 0's store would make the store client
    # log an error when rank 0 ends first, as correct programs do: so where
    # rank 0 hosts the store (not torchrun's agent, which outlives the ranks),
    # rank 0 stops every responder at its exit, before its store goes.
    global _store_host
    if _responder is not None:
        _responder.close()
        _responder = None
    _responder = StackResponder(
        made.spare.clone(),
        f"{made.prefix}/stack",
        rank,
        ring=made.spare.clone(),
        world_size=world_size,
        sync=functools.partial(sync_state, weakref.ref(made)),
    )
    _responder.start()
    hosts = rank == 0 and world_size > 1 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    _store_host = weakref.ref(made) if hosts else None
    global _finder
    _finder = threading.Thread(
        target=watch_node,
        args=(weakref.ref(made), made.spare.clone()),
        name="syncdeco-find-node",
        daemon=True,
    )
    _finder.start()
    exits.note_uncaught()
    _watch_nodes(made, env)
    return made


def _spans(made: Exchange) -> bool:
    """Whether this rank's job spans several nodes, as its launcher says."""
    size = made.place.local_size
    return size is not None and size < made.world_size


def _start_pulse(made: Exchange, env: Mapping[str, str]) -> None:
    """On a node's main, in a job that spans several nodes: this node's
    pulse (see ``pulse``), fed the pids of the node's ranks by watch_node."""
    global _pulse
    at = endpoint(made.store)
    if at is None or not _spans(made) or made.place.local_rank != 0:
        return
    if _pulse is not None:
        _pulse.close()
    try:
        _pulse = pulse.start(*at, startup.namespace(env), made.place.node, made.rank)
    except OSError as exc:
        _log.debug("rank %d could not start its node's pulse: %r", made.rank, exc)


def _watch_nodes(made: Exchange, env: Mapping[str, str]) -> None:
    """Make this rank's connections to the job's store notice the loss of
    its host (``keepalive``); in a job that spans several nodes, on a node's
    main, watch the other nodes (see ``nodewatch``)."""
    global _nodewatch, _storewatch
    at = endpoint(made.store)
    if at is None:
        return  # not a TCP store: nothing to tune, nowhere to renew a lease
    if _storewatch is None or (_storewatch.host, _storewatch.port) != at:
        try:
            _storewatch = StoreWatch(*at, made.store)
        except Exception as exc:
            _log.debug("rank %d could not watch the store's host: %r", made.rank, exc)
    keep_alive(*at)
    place = made.place
    if not _spans(made) or place.local_rank != 0:
        return
    if made.rank != 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # Rank 0 hosts the job's store: if its node is lost, the store is
        # too, which every rank's keepalive tells; and a watcher here would
        # use the store after rank 0 ended, which makes torch's client log.
        return
    ns = startup.namespace(env)
    try:
        # A connection of its own (a clone: a new client would make torch log).
        raw = underlying(made.store).clone()
        raw.set_timeout(timedelta(seconds=_WATCH_TIMEOUT))  # a clone has its source's timeout
        store = dist.PrefixStore(ns, raw)  # type: ignore[attr-defined]
        keep_alive(*at)
        report = functools.partial(_lost, weakref.ref(made))
        watch = NodeWatch(store, place.node, made.rank, report)
    except Exception as exc:
        _log.debug("rank %d could not start watching the other nodes: %r", made.rank, exc)
        return
    if _nodewatch is not None:
        _nodewatch.close()
    _nodewatch = watch
    watch.start()


def exchange(env: Mapping[str, str]) -> Exchange:
    """The exchange over the default group's store (made on first use)."""
    global _current
    group = dist.distributed_c10d._get_default_group()
    current = _current
    if current is not None and current[0]() is group:
        return current[1]
    with _lock:
        if _current is None or _current[0]() is not group:
            torch_store: Any = dist.distributed_c10d._get_default_store()
            made = _new_exchange(
                torch_store.clone(),  # a connection of syncdeco's own
                dist.get_rank(),
                dist.get_world_size(),
                env,
                spare=torch_store,
            )
            _current = (weakref.ref(group), made)
            remember_group()
        return _current[1]


# -- the ranks of this host watch each other ------------------------------------

# -- the ranks of this host watch each other ------------------------------------

_watch: DeathWatch | None = None  # the processes of this node's other ranks
# Ranks seen to end, not yet reported (a list: appends are atomic): their
# exit, and, for a rank of another node, that node's ranks.
_deaths: list[tuple[Failure, tuple[int, ...] | None]] = []
_pulse: pulse.Pulse | None = None  # this node's pulse, on a node's main
_nodewatch: NodeWatch | None = None  # the watch of the other nodes' leases
_storewatch: StoreWatch | None = None  # the watch of the job's store's host


_stopping = threading.Event()  # set at interpreter exit: the watch threads end
_finder: threading.Thread | None = None

_WATCH_TIMEOUT: Final = 60.0  # seconds a look at the leases may take (it never waits)
_FIND_FIRST: Final = 0.01  # seconds between the first looks for the node's ranks
_FIND_MOST: Final = 5.0  # ... and the longest, while some have not started yet


def watch_node(ref: weakref.ref[Exchange], store: Any) -> None:
    """Watch the processes of this node's other ranks through the kernel
    (see ``deathwatch``), as each says where it lives.  Runs in a
    thread of its own from the moment this rank joins, on a connection of
    its own that it closes when done: it looks for the node's ranks with
    backing-off checks (never a store wait that could time out, which
    makes torch log), about once every 5 s at most while one is slow to
    start.  When a watched process ends, the others are told at once if
    this rank is waiting at a sync point, else at its next one: never from
    a rank that is not using the store (at the end of a job whose store
    host has gone, that would make the store client log)."""
    pause = _FIND_FIRST
    watch = DeathWatch(functools.partial(_ended, ref))
    global _watch
    if _watch is not None:
        _watch.close()
    _watch = watch
    pending: set[int] | None = None  # the node's other ranks not watched yet
    while pending is None or pending:
        made = ref()
        if made is None or made.left or _stopping.is_set():
            return
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
                for rank, pid in near.items():
                    watch.watch(rank, pid)
                if _pulse is not None:
                    _pulse.serve(near)
                pending -= set(here)
        except Exception as exc:
            _log.debug("rank %d stopped looking for its node's ranks: %r", made.rank, exc)
            return  # the store has gone: nothing to report to
        if last:
            return  # that was the last look
        del made
        _stopping.wait(pause)
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


def _ended(ref: weakref.ref[Exchange], rank: int) -> None:
    # In the death watch's thread.
    made = ref()
    if made is None or made.left or _stopping.is_set():
        return  # a rank that said it is leaving reports nothing more (its node's others do)
    _deaths.append((exits.killed_failure(rank), None))
    _log.debug("rank %d saw rank %d's process end", made.rank, rank)
    if made.waiting is not None or made.lock.locked():  # inside a sync point
        report_deaths(made, made.spare or made.store)


def _overdue(rank: int) -> tuple[int, ...]:
    watch = _nodewatch
    return () if watch is None else watch.overdue(rank)


def _lost(ref: weakref.ref[Exchange], failures: list[Failure]) -> None:
    # In the node watch's thread: ranks of other nodes that ended, or whose
    # node was lost.
    made = ref()
    if made is None or made.left or _stopping.is_set():
        return
    _deaths.extend((f, f.lost_ranks or (f.rank,)) for f in failures)
    if made.waiting is not None or made.lock.locked():  # inside a sync point
        report_deaths(made, made.spare or made.store)


def report_deaths(made: Exchange, store: Any) -> None:
    """Tell the others of the ranks of this node seen to end (once each:
    ``report_killed`` settles who reports it first).  A store that cannot be
    reached (its host was the rank that ended) is left for the sync point to
    report."""
    while _deaths:
        failure, elsewhere = _deaths.pop()
        rank = failure.rank
        try:
            told = made.report_killed(failure, store, elsewhere=elsewhere)
            _log.debug("rank %d reported rank %d's end: %s", made.rank, rank, told)
        except Exception as exc:
            _log.debug("rank %d could not report rank %d's end: %r", made.rank, rank, exc)
            return


def announce_exit(exc: BaseException | None, *, at_exit: bool = False) -> None:
    """Tell the others that this rank's process is ending (``exc``: the
    exception that ends it, if any).  A rank waiting for it at a sync point
    (now or later) then raises RankExitedError at once instead of at its
    timeout.  Runs at interpreter exit (syncdeco registers it on import,
    ``at_exit``) and where syncdeco.testing ends a rank; a process killed by
    a signal, or ended by os._exit(), runs neither."""
    try:
        current = _current
        made = current[1] if current is not None else _early
        if made is not None:
            made.leave(exits.exit_failure(made.rank, exc))
        elif not _forked_child and DISTRIBUTED and dist.is_initialized():
            # No sync point ran here yet, but the others may be waiting at
            # their first: through an exchange over the group's store.  (A
            # forked child's group state is its parent's: it stays silent.)
            exchange(os.environ).leave(exits.exit_failure(dist.get_rank(), exc))
        elif not _forked_child and DISTRIBUTED and last_group is None:
            # No group yet: the others may be waiting at their first sync
            # point, over the launcher's store.  Reached within a couple of
            # seconds or not at all; never where this rank would host it, and
            # not from a multiprocessing child of a rank (a DataLoader
            # worker has its rank's variables), unless syncdeco.testing says
            # the child is the rank.
            launch = detect_launch(os.environ)
            store = startup.store_for_exit_notice(launch, os.environ, child=not at_exit)
            if launch is not None and store is not None:
                notice = Exchange(
                    store, launch.rank, launch.world_size, _place(os.environ, launch.rank)
                )
                notice.leave(exits.exit_failure(launch.rank, exc))
    except Exception:
        pass  # exiting anyway: the others fall back on their timeout


def _stop_watching() -> None:
    """At interpreter exit, before the exit notice: end the threads that may
    use the store (a daemon thread inside a store call when the interpreter
    tears down aborts the process: "terminate called without an active
    exception")."""
    _stopping.set()
    if _watch is not None:
        _watch.close()
    if _nodewatch is not None:
        _nodewatch.close()
        if _nodewatch.thread.is_alive() and _nodewatch.thread is not threading.current_thread():
            _nodewatch.thread.join(timeout=2.0)  # out of any store call before teardown
    finder = _finder
    if finder is not None and finder is not threading.current_thread():
        finder.join(timeout=2.0)


atexit.register(_stop_watching)


def _end_responders() -> None:
    """At interpreter exit, on the rank that hosts the job's store: stop the
    other ranks' stack responders (2 s at most) before the store ends with
    this process, so that none is left in a wait on it (see
    ``stacks.end_responders``)."""
    ref = _store_host
    made = ref() if ref is not None else None
    if made is None or made.spare is None:
        return
    try:
        late = end_responders(
            made.spare.clone(), f"{made.prefix}/stack", skip={made.rank, *made.gone}
        )
        if late:
            _log.debug("the stack responders of ranks %s did not stop in time", late)
    except Exception as exc:
        _log.debug("rank %d could not stop the others' stack responders: %r", made.rank, exc)


atexit.register(_end_responders)


def exit_notice() -> None:
    """At interpreter exit: ``announce_exit`` with the exception that ended
    the program, if one did."""
    announce_exit(exits.uncaught(), at_exit=True)


def launched(env: Mapping[str, str]) -> bool:
    """Whether the environment describes a multi-rank job (read once)."""
    if not _launched:
        launch = detect_launch(env)  # raises on a broken environment, every time
        _launched.append(launch is not None and launch.world_size > 1)
    return _launched[0]


def forget_environment() -> None:
    _launched.clear()


def _forget_in_child() -> None:
    # A forked child (notebook_launcher, multiprocessing) gets its own
    # variables, and is no member of the parent's group or exchange.
    global _current, last_group, _forked_child, _watch, _early, _responder, _finder, _store_host
    global _pulse, _nodewatch, _storewatch
    _current = last_group = _watch = _early = _responder = _store_host = None
    _finder = _pulse = _nodewatch = _storewatch = None
    _deaths.clear()
    # The parent's group, if any, looks initialised here too, but is not
    # this process's: it must not announce its exit there.
    _forked_child = DISTRIBUTED and dist.is_initialized()
    forget_environment()


os.register_at_fork(after_in_child=_forget_in_child)
