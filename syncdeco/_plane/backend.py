"""``TorchBackend``: syncdeco's sync points over torch.distributed."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping
from typing import Final, final

import torch
import torch.distributed as dist

from .._backend import Failure, SyncPoint
from .._env import local_rank_from_env
from .._errors import SyncError
from .._startup import agent_hosts, tcp_is_server
from . import group
from .group import SESSIONS
from .session import Session

__all__ = ["AUTO", "PREPARE_WAIT", "TorchBackend", "auto_backend"]

_log = logging.getLogger("syncdeco")

# How long a main rank under torchrun's agent store tries to join it before
# its body (the server is up before any rank starts: a fault, if it is not).
PREPARE_WAIT: Final = 10.0


@final
class TorchBackend:
    """Sync points over the default torch.distributed process group.

    Works with any process-group backend (Gloo, NCCL, ...): sync traffic goes
    through the group's store.  If no process group exists when it is first
    needed, sync points run over the launcher's store, and the first world
    sync point where every rank arrives and all is well makes the group with
    ``backend`` (default: ``"nccl"`` when CUDA is available, else ``"gloo"``).
    """

    __slots__ = ("__weakref__", "_backend", "_env", "_join_late")

    def __init__(self, backend: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            raise ValueError(
                f"TorchBackend(backend={backend!r}): expected one of torch.distributed's "
                f"backends: 'gloo', 'nccl', 'mpi', 'ucc' or 'xccl'"
            )
        self._backend = backend
        self._env = os.environ if env is None else env
        self._join_late = False  # (the agent's store did not let prepare() in)

    def __repr__(self) -> str:
        return f"TorchBackend({self._backend!r})" if self._backend else "TorchBackend()"

    def ensure_group(self, point: SyncPoint | None = None, timeout: float | None = None) -> None:
        """Bring up the default process group unless one exists; every rank
        must call it.  It is a sync point (``syncdeco.init``, waiting up to
        ``timeout`` seconds, None: forever): the group is made once every
        rank has arrived there, and a rank that does not arrive is named.
        Raises ``SyncError`` if this process's group has been destroyed."""
        if dist.is_initialized():
            return
        group.refuse_destroyed(point)
        here = SyncPoint("init", "syncdeco.init", next(_inits), "syncdeco.init()")
        self.sync(here, local=False, failure=None, payload=None, timeout=timeout)

    def _session(self, point: SyncPoint | None, timeout: float | None) -> Session:
        live = group.live_session()
        if live is not None:
            return live
        return group.session_for(self._backend, self._env, point, timeout)

    def prepare(self) -> None:
        """Say where this rank lives before a main rank runs a body that ends
        in a sync point.  Before any group exists, the rank that hosts the
        job's store (rank 0 outside torchrun's agent store) opens it now, so
        that the others reach it while it runs an hour-long first
        ``main_first``; under torchrun's agent store, whose server is up
        before any rank starts, the rank joins it now (for up to
        ``PREPARE_WAIT`` seconds, once; else at its sync point, which names
        the fault).  Either way its session runs while the body does: the
        others, waiting, can ask it where it is."""
        if group.live_session() is not None:
            return
        if dist.is_initialized():
            group.current_session(self._env)
            return
        group.refuse_destroyed(None)
        launch = group.launch_of(self._env)
        if tcp_is_server(launch, self._env):
            group.early_session(self._backend, self._env, None, None)
        elif agent_hosts(launch, self._env) and not self._join_late:
            try:
                group.early_session(self._backend, self._env, None, PREPARE_WAIT)
            except SyncError as exc:  # (said again, with the sync point, after the body)
                self._join_late = True
                _log.debug("rank %d joins at its sync point: %s", launch.rank, exc)

    # Rank facts have no side effects: they come from the process group if
    # there is one, else from the group syncdeco was using if it has been
    # destroyed (this process's rank in the job has not changed), else from
    # the launcher's environment.

    def rank(self) -> int:
        live = group.live_session()
        if live is not None:
            return live.exchange.rank
        if dist.is_initialized():
            return dist.get_rank()
        last = SESSIONS.last_group
        if last is not None:
            return last[1]
        return group.launch_of(self._env).rank

    def world_size(self) -> int:
        live = group.live_session()
        if live is not None:
            return live.exchange.world_size
        if dist.is_initialized():
            return dist.get_world_size()
        last = SESSIONS.last_group
        if last is not None:
            return last[2]
        return group.launch_of(self._env).world_size

    def local_rank(self) -> int:
        local = local_rank_from_env(self._env)
        return self.rank() if local is None else local

    def sync(
        self,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        """Meet the other ranks at ``point``; every rank of the scope must call it.

        Under ``torch.profiler`` the wait shows up as
        ``syncdeco.<kind>:<name>``; without a profiler this costs nothing."""
        session = self._session(point, timeout)
        exchange = session.exchange
        if session.deaths:  # ranks seen to end: tell the others first
            session.report_deaths(exchange.store)
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(f"syncdeco.{point.kind}:{point.name}"):
                result = exchange.sync(point, local, failure, payload, timeout)
        else:
            result = exchange.sync(point, local, failure, payload, timeout)
        if session.looking:  # every rank of the node has registered: look for them now
            session.look.set()
        return result


AUTO: Final = TorchBackend()
_inits = itertools.count(1)  # numbers the sync points that ensure_group makes


def auto_backend(env: Mapping[str, str]) -> TorchBackend | None:
    """The backend for an initialised group or a launcher's job, if any."""
    if group.live_session() is not None:
        return AUTO
    if not group.DISTRIBUTED:
        return None
    if dist.is_initialized():
        if SESSIONS.last_group is None:  # on the hot path: one check; a new group is
            group.remember_group()  # remembered when syncdeco first syncs over it
        return AUTO
    if SESSIONS.last_group is not None:
        return AUTO  # its group was destroyed: a sync point says so, rank facts stay
    return AUTO if group.launched(env) else None
