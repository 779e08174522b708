"""The backend protocol, the Null backend, and how a backend is chosen.

A backend is chosen at call time, never at import: an explicit one (set by
:func:`init` or :func:`use_backend`), else an initialised default process
group, else a launcher's environment, else :class:`NullBackend`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Final, Literal, Protocol, TypeAlias, final, runtime_checkable

__all__ = [
    "DEFAULT",
    "Backend",
    "Failure",
    "NullBackend",
    "SyncPoint",
    "Timeout",
    "get_backend",
    "init",
    "resolve_timeout",
    "use_backend",
]


class _Default(Enum):
    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Final = _Default.DEFAULT
"""Sentinel: use the timeout set by :func:`init` (30 minutes unless set)."""

Timeout: TypeAlias = "float | timedelta | Literal[_Default.DEFAULT] | None"

_BUILTIN_TIMEOUT: Final = 1800.0
_BUILTIN_WARN_AFTER: Final = 60.0


@final
@dataclass(frozen=True, slots=True)
class SyncPoint:
    """The identity of one arrival at a sync point.

    Ranks agree on a sync point when ``kind``, ``name`` and ``count`` are all
    equal; ``location`` (file and line) only serves error messages.
    """

    kind: str
    name: str
    count: int
    location: str

    def describe(self) -> str:
        return f"{self.kind} '{self.name}' (call {self.count}, {self.location})"


@final
@dataclass(frozen=True, slots=True)
class Failure:
    """An exception raised on one rank, reduced to strings so it can travel."""

    rank: int
    exc_type: str
    message: str
    traceback: str
    exited: bool = False  # the rank's process ended; exc_type is "" if no exception did it

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException) -> Failure:
        return cls(
            rank=rank,
            exc_type=type(exc).__qualname__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )


@runtime_checkable
class Backend(Protocol):
    """What syncdeco needs from a communication backend.

    Implement these four methods to run syncdeco over another transport.
    """

    def rank(self) -> int:
        """This process's global rank."""
        ...

    def world_size(self) -> int:
        """The number of ranks in the job."""
        ...

    def local_rank(self) -> int:
        """This process's rank within its node."""
        ...

    def sync(
        self,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        """Meet the other ranks of the scope at ``point``.  Every rank of the
        scope (the world, or this node when ``local``) must call it.

        Returns the scope main's ``payload``.  Raises ``PeerFailedError`` when
        another rank passed a ``failure``, ``SyncMismatchError`` when a rank
        is at another point, ``SyncTimeoutError`` when ranks are missing after
        ``timeout`` seconds (None: wait forever).  The rank that passed a
        failure gets no ``PeerFailedError`` for it.
        """
        ...


@final
class NullBackend:
    """A single process: every rank fact is 0 or 1 and sync points are free."""

    __slots__ = ("__weakref__",)

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def local_rank(self) -> int:
        return 0

    def sync(
        self,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        return payload

    def __repr__(self) -> str:
        return "NullBackend()"


_NULL: Final = NullBackend()
_scoped: ContextVar[Backend | None] = ContextVar("syncdeco_backend", default=None)


class _Config:
    """Process-wide settings made by :func:`init`."""

    lock = threading.Lock()
    backend: Backend | None = None
    timeout: float | None = _BUILTIN_TIMEOUT
    warn_after: float | None = _BUILTIN_WARN_AFTER


def _seconds(timeout: float | timedelta | None, what: str) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"{what} must be seconds (a number), a datetime.timedelta or None, "
            f"not {type(timeout).__name__}"
        )
    if not timeout > 0:
        raise ValueError(f"{what} must be positive, got {timeout!r}; None waits forever")
    return float(timeout)


def check_timeout(timeout: Timeout) -> None:
    """Validate a ``timeout=`` option when decorating."""
    if timeout is not DEFAULT:
        _seconds(timeout, "timeout")


def resolve_timeout(timeout: Timeout) -> float | None:
    """Seconds to wait at a sync point (None: forever)."""
    if timeout is DEFAULT:
        return _Config.timeout
    return _seconds(timeout, "timeout")


def warn_interval() -> float | None:
    """Seconds a sync point waits before syncdeco logs who is missing."""
    return _Config.warn_after


def get_backend() -> Backend:
    """The backend syncdeco would use for a sync point made now."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    configured = _Config.backend
    if configured is not None:
        return configured
    return _auto_backend(os.environ) or _NULL


def _auto_backend(env: Mapping[str, str]) -> Backend | None:
    # Bound on first use: _torch imports this module.
    global _auto_backend
    from ._torch import auto_backend

    _auto_backend = auto_backend
    return auto_backend(env)


def init(
    backend: Backend | str | None = None,
    *,
    timeout: float | timedelta | Literal[_Default.DEFAULT] | None = DEFAULT,
    warn_after: float | timedelta | Literal[_Default.DEFAULT] | None = DEFAULT,
) -> Backend:
    """Choose the backend for this process and the default sync timeout.

    ``backend`` is a :class:`Backend`, ``"null"``, ``"gloo"``, ``"nccl"``, or
    None to pick one now as :func:`get_backend` would (initialising the
    process group from the launcher's environment if needed).  ``timeout``
    is the default for every sync point: seconds, a ``timedelta``, or None
    to wait forever; left out, it stays at 30 minutes.  ``warn_after``: once
    a sync point has waited this long (default a minute; None: never), a
    warning is logged through ``logging`` once per interval, naming the
    ranks that arrived, those missing and where each was last seen.

    Not a collective by itself, but with a launcher's environment and no
    process group yet, it initialises one, which every rank must do.
    """
    if timeout is not DEFAULT:
        seconds = _seconds(timeout, "init(timeout=...)")
    else:
        seconds = _Config.timeout
    if warn_after is not DEFAULT:
        warn = _seconds(warn_after, "init(warn_after=...)")
    else:
        warn = _Config.warn_after
    chosen: Backend
    from ._torch import forget_environment

    forget_environment()
    if backend is None:
        chosen = _auto_backend(os.environ) or _NULL
    elif isinstance(backend, str):
        from ._torch import backend_from_name

        chosen = backend_from_name(backend, os.environ)
    elif isinstance(backend, Backend):
        chosen = backend
    else:
        raise TypeError(
            f"init(backend=...) takes a Backend, 'null', 'gloo', 'nccl' or None, "
            f"not {type(backend).__name__}"
        )
    from ._torch import TorchBackend

    if isinstance(chosen, TorchBackend):
        chosen.ensure_group(timeout=seconds)
    with _Config.lock:
        _Config.backend = chosen
        _Config.timeout = seconds
        _Config.warn_after = warn
    return chosen


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    """Use ``backend`` for sync points inside the ``with`` block (this
    thread or task only), then go back to the previous choice."""
    if not isinstance(backend, Backend):
        raise TypeError(
            f"use_backend() takes a Backend (NullBackend(), TorchBackend() or your "
            f"own), not {type(backend).__name__}"
        )
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)


def reset() -> None:
    """Forget :func:`init`'s choices and the environment read so far (for
    tests and notebooks)."""
    from ._torch import forget_environment

    forget_environment()
    with _Config.lock:
        _Config.backend = None
        _Config.timeout = _BUILTIN_TIMEOUT
        _Config.warn_after = _BUILTIN_WARN_AFTER
