"""Policies: what a decorator or context manager does before and after the
code it wraps, and on which ranks.

A policy is a small frozen value.  A stack of syncdeco decorators is one
wrapper holding a tuple of policies (outermost first); :func:`run` and
:func:`run_async` drive such a tuple around one call.  Each policy has two
halves, ``enter`` (before the body: go on, or skip it with a value) and
``exit`` (after the body, or after the body raised), so the same policy code
serves functions, coroutines and ``with`` blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar, Final, NamedTuple, TypeVar, final

from . import _trace
from ._backend import Backend, Failure, SyncPoint, Timeout, resolve_timeout
from ._errors import CompositionError, SyncError

__all__ = [
    "BarrierAfter",
    "MainFirst",
    "OnMainOnly",
    "Policy",
    "Site",
    "compose",
    "meet",
    "run",
    "run_async",
]

R = TypeVar("R")


@final
@dataclass(frozen=True, slots=True)
class Site:
    """Where a sync point lives: its name and its place in the source.

    Call counters (for ``every=``) are kept per site."""

    name: str
    location: str

    def __str__(self) -> str:
        return f"'{self.name}' ({self.location})"


class _Region(NamedTuple):
    kind: str  # "main_first" or "on_main_only"
    local: bool
    where: str


# The body of a main_first or on_main_only that is running right now.
_region: ContextVar[_Region | None] = ContextVar("syncdeco_region", default=None)


class _Counts:
    __slots__ = ("calls", "syncs")

    def __init__(self) -> None:
        self.syncs: dict[tuple[str, str, bool], int] = {}
        self.calls: dict[Site, int] = {}


_counts: weakref.WeakKeyDictionary[Backend, _Counts] = weakref.WeakKeyDictionary()
_strong_counts: dict[int, tuple[Backend, _Counts]] = {}


def _counts_for(backend: Backend) -> _Counts:
    try:
        counts = _counts.get(backend)
        if counts is None:
            counts = _counts[backend] = _Counts()
        return counts
    except TypeError:  # a user backend that cannot be weakly referenced
        entry = _strong_counts.get(id(backend))
        if entry is None or entry[0] is not backend:
            entry = _strong_counts[id(backend)] = (backend, _Counts())
        return entry[1]


def meet(
    backend: Backend,
    kind: str,
    site: Site,
    *,
    local: bool = False,
    failure: Failure | None = None,
    payload: object = None,
    timeout: Timeout,
) -> object:
    """Reach a sync point: every rank of the scope must call this."""
    region = _region.get()
    if region is not None:
        only = (
            "only on the main rank"
            if region.kind == "on_main_only"
            else ("on the main rank while the others wait, then on the others")
        )
        raise CompositionError(
            f"rank {backend.rank()} reached the sync point {kind} {site} "
            f"inside {region.kind} {region.where}, whose body runs {only}; the "
            f"ranks could never meet there. Move the sync point out of that "
            f"body, or stack it above @{region.kind} instead of calling it inside."
        )
    counts = _counts_for(backend)
    key = (kind, site.name, local)
    count = counts.syncs.get(key, 0) + 1
    counts.syncs[key] = count
    point = SyncPoint(kind, site.name, count, site.location)
    seconds = resolve_timeout(timeout)
    recorder = _trace.active
    if recorder is None:
        return backend.sync(point, local=local, failure=failure, payload=payload, timeout=seconds)
    return recorder.sync(
        backend, point, local=local, failure=failure, payload=payload, timeout=seconds
    )


def _report(
    backend: Backend, kind: str, site: Site, exc: BaseException, local: bool, timeout: Timeout
) -> None:
    """Tell the other ranks that this one failed; the caller re-raises ``exc``."""
    try:
        meet(
            backend,
            kind,
            site,
            local=local,
            failure=Failure.from_exception(backend.rank(), exc),
            timeout=timeout,
        )
    except SyncError as problem:
        exc.add_note(f"syncdeco: while telling the other ranks about this error: {problem}")


def _prepare(backend: Backend) -> None:
    # Optional backend hook, called before a body that ends in a sync point.
    prepare = getattr(backend, "prepare", None)
    if prepare is not None:
        prepare()


def _is_main(backend: Backend, local: bool) -> bool:
    return (backend.local_rank() if local else backend.rank()) == 0


_SKIP: Final = object()  # state of a policy that decided to do nothing


@final
@dataclass(frozen=True, slots=True)
class MainFirst:
    """The main rank runs the body first; the others wait for it, then run it."""

    site: Site
    local: bool
    timeout: Timeout
    kind: ClassVar[str] = "main_first"

    @property
    def syncs(self) -> bool:
        return True

    def enter(self, backend: Backend) -> tuple[bool, object]:
        region = _region.get()
        if region is not None and region.kind == "main_first" and region.local == self.local:
            return True, _SKIP  # already inside a main_first on the same ranks
        _prepare(backend)
        if not _is_main(backend, self.local):
            meet(backend, self.kind, self.site, local=self.local, timeout=self.timeout)
        return True, _region.set(_Region(self.kind, self.local, str(self.site)))

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> object:
        if state is _SKIP:
            if exc is not None:
                raise exc
            return result
        _region.reset(state)  # type: ignore[arg-type]
        if not _is_main(backend, self.local):
            if exc is not None:
                raise exc
            return result
        if exc is not None:
            _report(backend, self.kind, self.site, exc, self.local, self.timeout)
            raise exc
        meet(backend, self.kind, self.site, local=self.local, timeout=self.timeout)
        return result


@final
@dataclass(frozen=True, slots=True)
class OnMainOnly:
    """Only the main rank runs the body; the others return ``default``, or
    with ``broadcast`` wait for and return the main rank's result."""

    site: Site
    broadcast: bool
    default: object
    local: bool
    timeout: Timeout
    kind: ClassVar[str] = "on_main_only"

    @property
    def syncs(self) -> bool:
        return self.broadcast

    def enter(self, backend: Backend) -> tuple[bool, object]:
        if self.broadcast:
            _prepare(backend)
        if not _is_main(backend, self.local):
            if not self.broadcast:
                return False, self.default
            value = meet(backend, self.kind, self.site, local=self.local, timeout=self.timeout)
            return False, value
        return True, _region.set(_Region(self.kind, self.local, str(self.site)))

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> object:
        _region.reset(state)  # type: ignore[arg-type]
        if exc is not None:
            if self.broadcast:
                _report(backend, self.kind, self.site, exc, self.local, self.timeout)
            raise exc
        if self.broadcast:
            meet(
                backend,
                self.kind,
                self.site,
                local=self.local,
                payload=result,
                timeout=self.timeout,
            )
        return result


@final
@dataclass(frozen=True, slots=True)
class BarrierAfter:
    """Every rank runs the body, then all ranks meet (on every Nth call)."""

    site: Site
    every: int
    timeout: Timeout
    kind: ClassVar[str] = "barrier_after"

    @property
    def syncs(self) -> bool:
        return True

    @property
    def local(self) -> bool:
        return False

    def enter(self, backend: Backend) -> tuple[bool, object]:
        calls = _counts_for(backend).calls
        n = calls.get(self.site, 0) + 1
        calls[self.site] = n
        return True, n % self.every == 0

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> object:
        if exc is not None:
            if state:
                _report(backend, self.kind, self.site, exc, False, self.timeout)
            raise exc
        if state:
            meet(backend, self.kind, self.site, timeout=self.timeout)
        return result


Policy = MainFirst | OnMainOnly | BarrierAfter


def _decorator(policy: Policy) -> str:
    if isinstance(policy, OnMainOnly) and policy.broadcast:
        return "@on_main_only(broadcast=True)"
    return f"@{policy.kind}"


def compose(policies: Sequence[Policy], target: str) -> tuple[Policy, ...]:
    """The policies a stack (outermost first) runs, or CompositionError for a
    stack that could only deadlock.

    ``main_first`` right over ``on_main_only(broadcast=True)`` on the same
    ranks adds nothing: the broadcast already has the others wait for the
    main rank's result, and they never run the body, so it is dropped."""
    kept = [
        p
        for i, p in enumerate(policies)
        if not (
            isinstance(p, MainFirst)
            and i + 1 < len(policies)
            and isinstance(nxt := policies[i + 1], OnMainOnly)
            and nxt.broadcast
            and nxt.local == p.local
        )
    ]
    _refuse_deadlocks(kept, target)
    return tuple(kept)


def _refuse_deadlocks(policies: Sequence[Policy], target: str) -> None:
    for i, outer in enumerate(policies):
        if not isinstance(outer, (MainFirst, OnMainOnly)):
            continue
        for inner in policies[i + 1 :]:
            if not inner.syncs:
                continue
            if isinstance(outer, MainFirst) and isinstance(inner, MainFirst):
                if inner.local == outer.local:
                    continue  # same ranks: the inner one is a no-op
            if isinstance(outer, OnMainOnly):
                why = (
                    "runs only on the main rank, so the inner sync point would wait "
                    "forever for the others"
                )
            else:
                why = (
                    "runs its body on the main rank while the others wait, so the inner "
                    "sync point would pair the main rank with the others' wait"
                )
            raise CompositionError(
                f"{_decorator(outer)} over {_decorator(inner)} on {target}: "
                f"{_decorator(outer)} {why}. Put {_decorator(inner)} above "
                f"{_decorator(outer)} (outermost first), e.g. @barrier_after over "
                f"@on_main_only means 'the main rank saves, everybody waits'."
            )


def run(policies: Sequence[Policy], backend: Backend, body: Callable[[], R]) -> R:
    """Call ``body`` under ``policies`` (outermost first)."""
    entered: list[tuple[Policy, object]] = []
    exc: BaseException | None = None
    result: object = None
    try:
        for policy in policies:
            go, state = policy.enter(backend)
            if not go:
                result = state
                break
            entered.append((policy, state))
        else:
            recorder = _trace.active
            if recorder is None:
                result = body()
            else:
                result = recorder.body(policies[0].site.name, body)
    except BaseException as error:
        exc = error
    return _unwind(entered, backend, exc, result)  # type: ignore[return-value]


async def run_async(
    policies: Sequence[Policy], backend: Backend, body: Callable[[], Awaitable[R]]
) -> R:
    """:func:`run` for a coroutine function; sync points block the loop."""
    entered: list[tuple[Policy, object]] = []
    exc: BaseException | None = None
    result: object = None
    try:
        for policy in policies:
            go, state = policy.enter(backend)
            if not go:
                result = state
                break
            entered.append((policy, state))
        else:
            recorder = _trace.active
            if recorder is None:
                result = await body()
            else:
                result = await recorder.body_async(policies[0].site.name, body)
    except BaseException as error:
        exc = error
    return _unwind(entered, backend, exc, result)  # type: ignore[return-value]


def _unwind(
    entered: list[tuple[Policy, object]],
    backend: Backend,
    exc: BaseException | None,
    result: object,
) -> object:
    while entered:
        policy, state = entered.pop()
        try:
            result = policy.exit(backend, state, exc, result)
            exc = None
        except BaseException as error:
            exc = error
    if exc is not None:
        raise exc
    return result
