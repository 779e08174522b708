"""The process group's lifecycle, as syncdeco sees it.

* which :class:`Session` (an exchange and the threads that serve it) a
  sync point uses: the default group's;
* before any group exists, a session over the launcher's store (see
  ``syncdeco._startup``) whose exchange makes the group once every rank has
  met;
* remembering a destroyed group's rank facts;
* forgetting everything in a forked child;
* telling the others, at interpreter exit, that this rank is gone.

All of it is the state of one object, :data:`SESSIONS`.  Whether the sync
plane is used at all is decided in ``syncdeco._select``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Final, final

import torch
import torch.distributed as dist

from .. import _startup as startup
from .._backend import SyncPoint
from .._env import (
    Launch,
    detect_launch,
    local_rank_from_env,
    local_world_size_from_env,
    node_key,
    node_ranks_from_env,
)
from .._errors import SyncError, SyncTimeoutError
from . import exits, failfast, stacks, wire
from .exchange import Exchange, Place
from .session import Session

__all__ = [
    "DISTRIBUTED",
    "SESSIONS",
    "Sessions",
    "announce_exit",
    "at_exit",
    "current",
    "current_session",
    "early_session",
    "exit_notice",
    "group_world",
    "launch_of",
    "launched",
    "live_session",
    "refuse_destroyed",
    "session_for",
]

_log = logging.getLogger("syncdeco")

DISTRIBUTED: Final = dist.is_available()


@final
class Sessions:
    """This process's sessions, and what it knows of its process groups."""

    __slots__ = (
        "current",
        "early",
        "exiting",
        "forked_child",
        "last_group",
        "latest",
        "launched",
        "lock",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # The session over the default group's store, and that group (weakly:
        # a strong reference would keep the group alive after
        # destroy_process_group(), until interpreter teardown, where Gloo's
        # threads abort the process).
        self.current: tuple[weakref.ref[Any], Session] | None = None
        # The session over the launcher's store, while the group it will make
        # does not exist yet (see early_session).
        self.early: Session | None = None
        self.latest: Session | None = None  # the last one started: it serves
        # The last default group this process saw, with its rank and world
        # size there: after destroy_process_group() they are still its rank
        # facts, and a sync point raises instead of finding no group and
        # running alone on the Null backend.  Read on the hot path of a
        # plain process by syncdeco._select.
        self.last_group: tuple[weakref.ref[Any], int, int] | None = None
        self.forked_child = False  # forked from a process with a group (see forget_in_child)
        # Whether the environment describes a multi-rank job, read once per
        # process (a launcher sets it before the process starts); init() and
        # reset() forget it.
        self.launched: bool | None = None
        self.exiting = False  # the interpreter is exiting: sessions stop

    def start(self, session: Session) -> None:
        """Start ``session`` in place of the last one (under the lock)."""
        previous, self.latest = self.latest, session
        if self.exiting:
            session.stopping.set()  # its watch threads end at once
        session.start(previous)

    def stop(self) -> None:
        """At interpreter exit, before the exit notice: end the sessions'
        threads that may use the store (see ``Session.stop``)."""
        self.exiting = True
        for session in self._live():
            session.stop()

    def end_responders(self) -> None:
        """At interpreter exit, where this process hosts the job's store:
        stop the other ranks' stack responders (see ``Session.end_responders``)."""
        if self.latest is not None:
            self.latest.end_responders()

    def await_group(self) -> None:
        """At interpreter exit (see ``at_exit``): wait for the others to have
        up the group this rank's first sync point made (see
        ``Session.await_group``)."""
        if self.latest is not None and not self.forked_child:
            self.latest.await_group()

    def forget_in_child(self) -> None:
        """In a forked child (notebook_launcher, multiprocessing): it gets
        its own variables, and is no member of the parent's group or
        session (whose threads it does not have)."""
        self.lock = threading.Lock()
        self.current = self.early = self.latest = self.last_group = None
        # The parent's group, if any, looks initialised here too, but is not
        # this process's: it must not announce its exit there.
        self.forked_child = DISTRIBUTED and dist.is_initialized()
        self.launched = None

    def _live(self) -> list[Session]:
        found = [self.latest, self.early, self.current[1] if self.current is not None else None]
        return list({id(s): s for s in found if s is not None}.values())


SESSIONS: Final = Sessions()


class _NoGroups:
    """c10d's world where torch.distributed is not built: never a group."""

    _default_pg = None


def group_world() -> Any:
    """An object whose ``_default_pg`` is None exactly when
    ``dist.is_initialized()`` is False: torch's own ``_World``, read on hot
    paths as one attribute read instead of a call.  None where torch's
    internals are not as syncdeco knows them (then those paths keep calling
    ``dist.is_initialized()``)."""
    if not DISTRIBUTED:
        return _NoGroups
    world = getattr(dist.distributed_c10d, "_world", None)
    try:
        if (world._default_pg is not None) is not dist.is_initialized():  # type: ignore[union-attr]
            return None
    except AttributeError:
        return None
    return world


_WORLD: Final = group_world()


def live_session() -> Session | None:
    """The session of the default group, while that group is the default
    one: what every sync point, and every rank fact it asks for, looks up
    first, in three attribute reads (torch's ``is_initialized()``,
    ``get_rank()`` and ``_get_default_group()`` are several calls each,
    and a sync point asked them eleven times).  None before the session is
    made, after the group is destroyed or replaced, and where torch's
    internals are unknown: then the callers take the long way."""
    made = SESSIONS.current
    if made is None or _WORLD is None:
        return None
    default = _WORLD._default_pg
    return made[1] if default is not None and made[0]() is default else None


def current() -> Session | None:
    """The session of the default group, if one was made (the group may
    have been destroyed since)."""
    made = SESSIONS.current
    return made[1] if made is not None else None


def remember_group() -> None:
    group = dist.distributed_c10d._get_default_group()
    last = SESSIONS.last_group
    if last is None or last[0]() is not group:
        SESSIONS.last_group = (weakref.ref(group), dist.get_rank(), dist.get_world_size())


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
    last = SESSIONS.last_group
    if last is not None:
        where = f"at {point.describe()}" if point is not None else "before a sync point"
        raise SyncError(
            f"rank {last[1]} {where}: the process group this process used has "
            f"been destroyed (torch.distributed.destroy_process_group()), so no sync "
            f"point can be reached. Move sync points before the teardown, or "
            f"call init_process_group() again first."
        )


def session_for(
    backend: str | None, env: Mapping[str, str], point: SyncPoint | None, timeout: float | None
) -> Session:
    """The session for a sync point: over the default group's store, or,
    before any group exists, over the launcher's store (reached within
    ``timeout`` seconds; None: forever), whose exchange makes the group
    (with ``backend``) once every rank has met at a world sync point."""
    if dist.is_initialized():
        return current_session(env)
    refuse_destroyed(point)
    return early_session(backend, env, point, timeout)


def early_session(
    backend: str | None, env: Mapping[str, str], point: SyncPoint | None, timeout: float | None
) -> Session:
    """The session over the launcher's store, before the group exists
    (made and started on first call).  Sync traffic needs only the store:
    the first sync point keeps every promise the later ones keep, and no
    rank waits in torch's rendezvous, which has a timeout of its own and
    names nobody."""
    made = SESSIONS.early
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
    with SESSIONS.lock:
        if SESSIONS.early is None:
            made = Session(
                job.store.clone(),  # a connection of the exchange's own
                launch.rank,
                launch.world_size,
                _place(env, launch.rank),
                env,
                spare=job.store,
                wire_device=functools.partial(wire.wire_device, name),
            )
            made.exchange.on_met = functools.partial(_make_group, weakref.ref(made), job, name)
            SESSIONS.start(made)
            SESSIONS.early = made
        return SESSIONS.early


def _make_group(ref: weakref.ref[Session], job: startup.JobStore, backend: str) -> None:
    """Every rank has just met at a world sync point where all is well: make
    the default group over the job's store (Gloo's rendezvous is quick, as
    every rank is on its way to it) and carry on with the same session."""
    made = ref()
    if made is None:
        return
    exchange = made.exchange
    if not dist.is_initialized():  # else the program made one meanwhile: use it
        dist.init_process_group(
            backend, store=job.group_store(), rank=exchange.rank, world_size=exchange.world_size
        )
        made.made_group()
    group = dist.distributed_c10d._get_default_group()
    with SESSIONS.lock:
        SESSIONS.current = (weakref.ref(group), made)
        SESSIONS.early = None
    exchange.on_met = None
    exchange.wire_device = wire.wire_device
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
    return Place(
        node_key(env),
        rank if local is None else local,
        local_world_size_from_env(env),
        node_ranks_from_env(env),
    )


def current_session(env: Mapping[str, str]) -> Session:
    """The session over the default group's store (made and started on
    first use)."""
    group = dist.distributed_c10d._get_default_group()
    made = SESSIONS.current
    if made is not None and made[0]() is group:
        return made[1]
    with SESSIONS.lock:
        made = SESSIONS.current
        if made is None or made[0]() is not group:
            torch_store: Any = dist.distributed_c10d._get_default_store()
            rank = dist.get_rank()
            session = Session(
                torch_store.clone(),  # a connection of syncdeco's own
                rank,
                dist.get_world_size(),
                _place(env, rank),
                env,
                spare=torch_store,
            )
            SESSIONS.start(session)
            made = SESSIONS.current = (weakref.ref(group), session)
            remember_group()
        return made[1]


def announce_exit(exc: BaseException | None, *, at_exit: bool = False) -> None:
    """Tell the others that this rank's process is ending (``exc``: the
    exception that ends it, if any).  A rank waiting for it at a sync point
    (now or later) then raises RankExitedError at once instead of at its
    timeout.  Runs at interpreter exit (syncdeco registers it on import,
    ``at_exit``) and where syncdeco.testing ends a rank; a process killed by
    a signal, or ended by os._exit(), runs neither."""
    try:
        # Both, where a main made the group itself inside the body of its
        # first main_first: the others wait on the early session's store.
        made = [s for s in dict.fromkeys((current(), SESSIONS.early)) if s is not None]
        if made:
            for each in made:
                try:
                    each.leave(exc)
                except Exception as problem:
                    _log.debug("rank %d could not say it ends: %r", each.exchange.rank, problem)
        elif not SESSIONS.forked_child and DISTRIBUTED and dist.is_initialized():
            # No sync point ran here yet, but the others may be waiting at
            # their first: through a session over the group's store.  (A
            # forked child's group state is its parent's: it stays silent.)
            current_session(os.environ).leave(exc)
        elif not SESSIONS.forked_child and DISTRIBUTED and SESSIONS.last_group is None:
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


def exit_notice() -> None:
    """At interpreter exit: ``announce_exit`` with the exception that ended
    the program, if one did."""
    announce_exit(exits.uncaught(), at_exit=True)


def at_exit() -> None:
    """syncdeco's exit, in this order: the stack responders end; a rank
    waits for the others to have up the group its first sync point made;
    the store's host ends the others' responders; every session's watch
    threads end; fail-fast notes how this rank ended; the exit notice.
    Called by the one atexit handler that ``import syncdeco`` registers, so
    that every handler registered after that import runs first, and may
    still meet the others at sync points with all of this up.  A step that
    fails, or is interrupted, is logged, and the next runs."""
    steps = (
        stacks.end_all,
        SESSIONS.await_group,
        SESSIONS.end_responders,
        SESSIONS.stop,
        failfast.note_at_exit,
        exit_notice,
    )
    for step in steps:
        try:
            step()
        except BaseException:  # (a second Ctrl-C, a SIGTERM handler's sys.exit: as atexit would)
            _log.exception("syncdeco's exit step %s failed", step.__qualname__)


def launched(env: Mapping[str, str]) -> bool:
    """Whether the environment describes a multi-rank job (read once)."""
    known = SESSIONS.launched
    if known is None:
        launch = detect_launch(env)  # raises on a broken environment, every time
        known = SESSIONS.launched = launch is not None and launch.world_size > 1
    return known


def forget_environment() -> None:
    SESSIONS.launched = None


os.register_at_fork(after_in_child=SESSIONS.forget_in_child)
