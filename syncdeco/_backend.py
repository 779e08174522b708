"""The backend protocol, the Null backend, what a sync point carries
(:class:`SyncPoint`, :class:`Failure`) and the process-wide timeouts.

How a backend is chosen is :mod:`syncdeco._select`'s concern.
"""

from __future__ import annotations

import threading
import traceback
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
    "resolve_timeout",
    "warn_interval",
]


class _Default(Enum):
    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Final = _Default.DEFAULT
"""Sentinel: use the timeout set by :func:`init` (30 minutes unless set)."""

Timeout: TypeAlias = float | timedelta | Literal[_Default.DEFAULT] | None
"""What a ``timeout=`` option takes: seconds (a number) or a ``timedelta``;
``None`` (or ``math.inf``) to wait forever; :data:`DEFAULT` for the timeout
set by :func:`init`."""

_BUILTIN_TIMEOUT: Final = 1800.0
_BUILTIN_WARN_AFTER: Final = 60.0


@final
@dataclass(frozen=True, slots=True)
class SyncPoint:
    """The identity of one arrival at a sync point.

    Ranks agree on a sync point when ``kind``, ``name`` and ``count`` (how
    many times this rank has reached a sync point of that kind and name)
    are all equal.  ``location`` (file and line: of the decorated function,
    or of the ``with`` block or ``barrier()`` call), ``called`` (file and
    line of the call of a decorated function, where known) and ``call``
    (for ``barrier_after``: the decorated function's call that meets, 10
    for the tenth call with ``every=5``; 0 where it is ``count``) only
    serve messages.
    """

    kind: str
    name: str
    count: int
    location: str
    called: str = ""
    call: int = 0

    def describe(self) -> str:
        """How error messages name it: ``barrier 'end of epoch' (call 1, train.py:40)``,
        ``main_first 'load' (call 1, train.py:12, called from train.py:40)``."""
        called = f", called from {self.called}" if self.called else ""
        return (
            f"{self.kind} '{self.name}' (call {self.call or self.count}, {self.location}{called})"
        )


@final
@dataclass(frozen=True, slots=True)
class Failure:
    """An exception raised on one rank, reduced to strings so it can travel."""

    rank: int
    exc_type: str
    message: str
    traceback: str
    exited: bool = False  # the rank's process ended; exc_type is "" if no exception did it
    killed: bool = False  # ... without running Python's exit handlers (a signal, os._exit())
    lost_host: str = ""  # ... with its node, lost (power, a cut link): the host's name
    lost_ranks: tuple[int, ...] = ()  # ... and the ranks that ran there

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException) -> Failure:
        """``exc``, raised on ``rank``, with its type name, message and
        traceback.  Never raises: a message whose ``str()`` fails still
        travels (the other ranks must hear of the failure)."""
        try:
            message = str(exc)
        except Exception as bad:
            message = f"<str() of the exception raised {type(bad).__qualname__}: {bad!r}>"
        return cls(
            rank=rank,
            exc_type=type(exc).__qualname__,
            message=message,
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


class _Config:
    """Process-wide settings made by :func:`init`."""

    lock = threading.Lock()
    backend: Backend | None = None
    timeout: float | None = _BUILTIN_TIMEOUT
    warn_after: float | None = _BUILTIN_WARN_AFTER
    fail_fast: bool | None = None  # None: as SYNCDECO_FAIL_FAST says (on if unset)

    @classmethod
    def reset(cls) -> None:
        cls.timeout = _BUILTIN_TIMEOUT
        cls.warn_after = _BUILTIN_WARN_AFTER
        cls.fail_fast = None


# A timeout at least this long (about 32 years), math.inf and timedelta.max
# among them, waits forever as None does: nobody means a deadline that far
# off, and the waits under a sync point could not represent it.
_FOREVER_AFTER: Final = 1e9


def _seconds(timeout: float | timedelta | None, what: str) -> float | None:
    """Seconds to wait, or None for forever; ``what`` names the option."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"{what} must be seconds (a number), a datetime.timedelta or None, "
            f"not {type(timeout).__name__}"
        )
    if timeout != timeout:
        raise ValueError(
            f"{what} must be a number of seconds, got nan; pass seconds > 0, or None "
            f"(or math.inf) to wait forever"
        )
    if timeout <= 0:
        raise ValueError(
            f"{what} must be positive, got {timeout!r}; pass the seconds to wait, or "
            f"None (or math.inf) to wait forever"
        )
    if timeout >= _FOREVER_AFTER:
        return None
    return float(timeout)


def resolve_timeout(timeout: Timeout) -> float | None:
    """Seconds to wait at a sync point (None: forever)."""
    if timeout is DEFAULT:
        return _Config.timeout
    return _seconds(timeout, "timeout=")


def warn_interval() -> float | None:
    """Seconds a sync point waits before syncdeco logs who is missing."""
    return _Config.warn_after
