"""``TorchBackend``: syncdeco's sync points over torch.distributed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final, final

import torch
import torch.distributed as dist

from .._backend import Failure, SyncPoint
from .._env import local_rank_from_env
from . import group
from .exchange import Exchange

__all__ = ["AUTO", "TorchBackend", "auto_backend"]


@final
class TorchBackend:
    """Sync points over the default torch.distributed process group.

    Works with any process-group backend (Gloo, NCCL, ...): sync traffic goes
    through the group's store.  If no process group exists when it is first
    needed, it initialises one from the launcher's environment with
    ``backend`` (default: ``"nccl"`` when CUDA is available, else ``"gloo"``).
    """

    __slots__ = ("__weakref__", "_backend", "_env")

    def __init__(self, backend: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            raise ValueError(f"TorchBackend(backend={backend!r}): expected 'gloo' or 'nccl'")
        self._backend = backend
        self._env = os.environ if env is None else env

    def __repr__(self) -> str:
        return f"TorchBackend({self._backend!r})" if self._backend else "TorchBackend()"

    def ensure_group(self, point: SyncPoint | None = None) -> None:
        """Initialise the default process group from the launcher's
        environment unless one exists.  Every rank must call it.  Raises
        ``SyncError`` if this process's group has been destroyed."""
        group.ensure_group(self._backend, self._env, point)

    def _exchange(self, point: SyncPoint | None = None) -> Exchange:
        group.ensure_group(self._backend, self._env, point)
        return group.exchange(self._env)

    def prepare(self) -> None:
        """Join (or create) the process group and say where this rank lives.

        syncdeco calls it before a main rank runs a body that ends in a sync
        point, so that an hour-long first ``main_first`` does not keep the
        others waiting in the group's own rendezvous, which has a timeout."""
        self._exchange()

    # Rank facts have no side effects: they come from the process group if
    # there is one, else from the group syncdeco was using if it has been
    # destroyed (this process's rank in the job has not changed), else from
    # the launcher's environment.

    def rank(self) -> int:
        if dist.is_initialized():
            return dist.get_rank()
        if group.last_group is not None:
            return group.last_group[1]
        return group.launch_of(self._env).rank

    def world_size(self) -> int:
        if dist.is_initialized():
            return dist.get_world_size()
        if group.last_group is not None:
            return group.last_group[2]
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
        exchange = self._exchange(point)
        if group._deaths:  # ranks of this host that ended: tell the others first
            group.report_deaths(exchange, exchange.store)
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(f"syncdeco.{point.kind}:{point.name}"):
                result = exchange.sync(point, local, failure, payload, timeout)
        else:
            result = exchange.sync(point, local, failure, payload, timeout)
        if group._watched is not exchange:
            group.watch_node(exchange)
        return result


AUTO: Final = TorchBackend()


def auto_backend(env: Mapping[str, str]) -> TorchBackend | None:
    """The backend for an initialised group or a launcher's job, if any."""
    if not group.DISTRIBUTED:
        return None
    if dist.is_initialized():
        if group.last_group is None:  # on the hot path: one check; a new group is
            group.remember_group()  # remembered when syncdeco first syncs over it
        return AUTO
    if group.last_group is not None:
        return AUTO  # its group was destroyed: a sync point says so, rank facts stay
    return AUTO if group.launched(env) else None
