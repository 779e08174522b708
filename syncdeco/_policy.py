"""Policies: what a decorator or context manager does before and after the
code it wraps, and on which ranks.

A policy is a small frozen value.  A stack of syncdeco decorators is one
wrapper holding a tuple of policies (outermost first).  Each policy has two
halves, ``enter`` (before the body: go on, or skip it with a value) and
``exit`` (after the body, or after the body raised).  A half that may
block (join the process group, meet the other ranks) returns the one thing
it needs done (a need); ``enter`` then decides in ``entered``, from that
need's result.  A half that cannot block returns its decision plainly.

:func:`around` is the one skeleton of a call under a tuple of policies, for
functions, coroutines, ``with`` and ``async with`` blocks alike: steps that
never block by themselves.  Sync and async code differ in one place, the
driver: :func:`advance` does each need in this thread (``_do``);
:func:`advance_async` hands it to syncdeco's worker thread and awaits it
(``_do_async``), so an event loop runs its other tasks while its rank waits.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Generator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import FrameType
from typing import ClassVar, Final, NamedTuple, TypeAlias, cast, final

import wrapt

from . import _trace
from ._backend import Backend, Failure, SyncPoint, Timeout, resolve_timeout
from ._errors import CompositionError, SyncError
from ._plane.share import Share, unshare
from ._worker import drain_before_sync, off_loop, the_worker

__all__ = [
    "BODY",
    "Around",
    "BarrierAfter",
    "Entered",
    "Exited",
    "MainFirst",
    "OnMainOnly",
    "Outcome",
    "Policy",
    "Site",
    "advance",
    "advance_async",
    "around",
    "compose",
    "decorator",
    "meet",
]


@final
@dataclass(frozen=True, slots=True)
class Site:
    """Where a sync point lives: its name and its place in the source.

    Call counters (for ``every=``) are kept per site (and per place in a
    stack: see :class:`BarrierAfter`)."""

    name: str
    location: str

    def __str__(self) -> str:
        return f"'{self.name}' ({self.location})"


class _Region(NamedTuple):
    kind: str  # "main_first" or "on_main_only"
    local: bool
    where: Site  # (formatted only for a message: not on every call)


# The body of a main_first or on_main_only that is running right now.
_region: ContextVar[_Region | None] = ContextVar("syncdeco_region", default=None)


class _Counts:
    __slots__ = ("calls", "prepared", "syncs")

    def __init__(self) -> None:
        self.prepared = False  # backend.prepare() has returned once (async code)
        self.syncs: dict[tuple[str, str, bool], int] = {}
        self.calls: dict[tuple[Site, int], int] = {}  # per BarrierAfter site and nth


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


# Frames that are not the user's call of a decorated function: syncdeco's
# own, and wrapt's where its wrapper runs as Python.
_NOT_THE_CALLER: Final = tuple(
    os.path.dirname(os.path.abspath(file)) + os.sep for file in (__file__, wrapt.__file__ or "")
)


def call_site(frame: FrameType | None) -> str:
    """Where ``frame`` (the frame that called a decorated function) is now,
    as ``file.py:LINE``; "" when unknown."""
    while frame is not None and frame.f_code.co_filename.startswith(_NOT_THE_CALLER):
        frame = frame.f_back
    if frame is None:
        return ""
    return f"{_file_name(frame.f_code.co_filename)}:{frame.f_lineno}"


@functools.lru_cache(maxsize=256)
def _file_name(path: str) -> str:
    return os.path.basename(path)  # (once per file: every sync point names its caller's)


def _arrive(
    backend: Backend,
    kind: str,
    site: Site,
    local: bool,
    caller: FrameType | None = None,
    call: int = 0,
) -> SyncPoint:
    """This rank's next arrival at a sync point: checked (not inside a body
    that runs on the main rank only) and counted, in the caller's thread.
    ``caller``: the frame that called the decorated function, if any;
    ``call``: its count of calls, where messages say it (else 0)."""
    region = _region.get()
    if region is not None:
        only = (
            "only on the main rank"
            if region.kind == "on_main_only"
            else "on the main rank while the others wait, then on the others"
        )
        if kind == "barrier":
            fix = f"call sd.barrier() before or after the {region.kind} function"
        else:
            fix = f"stack @{kind} above @{region.kind} instead of calling it inside"
        raise CompositionError(
            f"rank {backend.rank()} reached the sync point {kind} {site} "
            f"inside {region.kind} {region.where}, whose body runs {only}; the "
            f"ranks could never meet there. Move the sync point out of that "
            f"body: {fix}."
        )
    counts = _counts_for(backend)
    key = (kind, site.name, local)
    count = counts.syncs.get(key, 0) + 1
    counts.syncs[key] = count
    return SyncPoint(kind, site.name, count, site.location, call_site(caller), call)


def _sync(
    backend: Backend,
    point: SyncPoint,
    local: bool,
    failure: Failure | None,
    payload: object,
    seconds: float | None,
) -> object:
    """Wait at ``point`` (blocks: in async code it runs in the worker thread)."""
    drain_before_sync()
    recorder = _trace.active
    if recorder is None:
        return backend.sync(point, local=local, failure=failure, payload=payload, timeout=seconds)
    return recorder.sync(
        backend, point, local=local, failure=failure, payload=payload, timeout=seconds
    )


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
    point = _arrive(backend, kind, site, local)
    return _sync(backend, point, local, failure, payload, resolve_timeout(timeout))


def _failure(backend: Backend, exc: BaseException) -> Failure:
    failure = Failure.from_exception(backend.rank(), exc)
    if not failure.message and failure.exc_type == "CancelledError":
        # asyncio's CancelledError has no message: say what it means
        failure = replace(failure, message="the task running it was cancelled")
    return failure


def _prepare(backend: Backend) -> None:
    # Optional backend hook, called before a body that ends in a sync point.
    prepare = getattr(backend, "prepare", None)
    if prepare is not None:
        prepare()


# -- what a policy needs done, and how it is done ------------------------------


class _Meet(NamedTuple):
    """Meet the other ranks at the sync point ``kind`` at ``site``.

    ``prepare``: join the backend's group first (the first time, that may
    block).  ``reporting``: tell the others this rank raised it (the caller
    re-raises it).  ``call``: the decorated function's call that meets
    (``barrier_after``, whose messages say it), or 0: the sync point's own
    count.  A tuple: made on every decorated call that syncs."""

    backend: Backend
    kind: str
    site: Site
    local: bool
    timeout: Timeout
    payload: object = None
    reporting: BaseException | None = None
    prepare: bool = False
    call: int = 0


class _Prepare(NamedTuple):
    """Join the backend's group before the main rank runs a body that ends
    at the sync point ``at``."""

    at: _Meet


_Need: TypeAlias = "_Prepare | _Meet"
_NEEDS: Final = (_Prepare, _Meet)


def _do(need: _Need, caller: FrameType | None) -> object:
    """Do what ``need`` asks, in this thread (``caller``: the frame that
    called the decorated function, if any, which the sync point names)."""
    if isinstance(need, _Prepare):
        _prepare(need.at.backend)
        return None
    backend, kind, site, local, timeout, payload, exc, prepare, call = need
    if prepare:
        _prepare(backend)
    point = _arrive(backend, kind, site, local, caller, call)
    if exc is None:
        return _sync(backend, point, local, None, payload, resolve_timeout(timeout))
    try:
        _sync(backend, point, local, _failure(backend, exc), None, resolve_timeout(timeout))
    except SyncError as problem:
        exc.add_note(f"syncdeco: while telling the other ranks about this error: {problem}")
    return None


def _prepare_once(backend: Backend) -> None:
    _prepare(backend)
    _counts_for(backend).prepared = True


async def _do_async(need: _Need, caller: FrameType | None) -> object:
    """What :func:`_do` does, with every wait in the worker thread.

    A sync point this rank has reached is always completed, in order, even
    when the task waiting there is cancelled: the task gets CancelledError
    at once and the exchange ends in the background, so the other ranks are
    never left waiting for this one."""
    import asyncio  # imported by whoever runs an event loop; not at import time

    if isinstance(need, _Prepare):
        backend = need.at.backend
        if _counts_for(backend).prepared:  # joined already: what is left is quick
            _prepare(backend)
            return None
        try:
            await off_loop(functools.partial(_prepare_once, backend), None)
        except asyncio.CancelledError as cancelled:
            # Cancelled before its body: the others hear so at its sync point.
            await _do_async(need.at._replace(reporting=cancelled), caller)
            raise
        return None
    backend, exc = need.backend, need.reporting
    prepare = need.prepare and not _counts_for(backend).prepared
    if need.prepare and not prepare:
        _prepare(backend)
    try:
        point = _arrive(backend, need.kind, need.site, need.local, caller, need.call)
        failure = None if exc is None else _failure(backend, exc)
        call = functools.partial(
            _prepare_and_sync if prepare else _sync,
            backend,
            point,
            need.local,
            failure,
            need.payload,
            resolve_timeout(need.timeout),
        )
        what = (backend.rank(), point)
        if exc is None:
            return await off_loop(call, what)
        if isinstance(exc, asyncio.CancelledError):
            # A cancelled task does not wait: it gets its CancelledError now,
            # and its report goes out in the background, in order.
            the_worker().submit(call, what, None, None)
        else:
            await off_loop(call, what)
    except SyncError as problem:
        if exc is None:
            raise
        exc.add_note(f"syncdeco: while telling the other ranks about this error: {problem}")
    return None


def _prepare_and_sync(
    backend: Backend,
    point: SyncPoint,
    local: bool,
    failure: Failure | None,
    payload: object,
    seconds: float | None,
) -> object:
    _prepare_once(backend)
    return _sync(backend, point, local, failure, payload, seconds)


def _is_main(backend: Backend, local: bool) -> bool:
    return (backend.local_rank() if local else backend.rank()) == 0


_SKIP: Final = object()  # state of a policy that decided to do nothing

# What a policy half returns: ``enter`` its decision (go on?, state), or the
# one need it has before it can decide, whose result then goes to
# ``entered`` for the decision; ``exit`` the one sync point it meets at, if
# any.  No half waits for more than one thing, so none is a generator.
Entered: TypeAlias = "tuple[bool, object] | _Need"
Exited: TypeAlias = "_Meet | None"


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

    def enter(self, backend: Backend) -> Entered:
        region = _region.get()
        if region is not None and region.kind == "main_first" and region.local == self.local:
            return True, _SKIP  # already inside a main_first on the same ranks
        at = _Meet(backend, self.kind, self.site, self.local, self.timeout, prepare=True)
        return _Prepare(at) if _is_main(backend, self.local) else at

    def entered(self, need: _Need, synced: object) -> tuple[bool, object]:
        """After ``need``: the main rank has joined, another has waited for it."""
        return True, _region.set(_Region(self.kind, self.local, self.site))

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> Exited:
        if state is _SKIP:
            return None
        _region.reset(state)  # type: ignore[arg-type]
        if not _is_main(backend, self.local):
            return None
        return _Meet(backend, self.kind, self.site, self.local, self.timeout, None, exc)


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
    share: bool = False  # with broadcast: a node's ranks get the same memory
    kind: ClassVar[str] = "on_main_only"

    @property
    def syncs(self) -> bool:
        return self.broadcast

    def enter(self, backend: Backend) -> Entered:
        main = _is_main(backend, self.local)
        if self.broadcast:
            at = _Meet(backend, self.kind, self.site, self.local, self.timeout, prepare=True)
            return _Prepare(at) if main else at
        if not main:
            return False, self.default
        return True, _region.set(_Region(self.kind, self.local, self.site))

    def entered(self, need: _Need, synced: object) -> tuple[bool, object]:
        """After ``need``: the main rank has joined; another has the main
        rank's result (``synced``), and returns it."""
        if need.__class__ is _Meet:
            return False, unshare(synced)
        return True, _region.set(_Region(self.kind, self.local, self.site))

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> Exited:
        _region.reset(state)  # type: ignore[arg-type]
        if not self.broadcast:
            return None
        payload = None if exc is not None else Share(result) if self.share else result
        return _Meet(backend, self.kind, self.site, self.local, self.timeout, payload, exc)


@final
@dataclass(frozen=True, slots=True)
class BarrierAfter:
    """Every rank runs the body, then all ranks meet (on every Nth call).

    Calls are counted per site and per ``nth``: which ``barrier_after`` of
    that site it is in its stack (0 innermost, set by :func:`compose`), so
    each decorator of a stack counts the calls it sees.  Messages say the
    call that meets (``every=5``: calls 5, 10, 15); ranks agree on the
    sync point by its count of meetings, as on any other."""

    site: Site
    every: int
    timeout: Timeout
    nth: int = 0
    kind: ClassVar[str] = "barrier_after"

    @property
    def syncs(self) -> bool:
        return True

    @property
    def local(self) -> bool:
        return False

    def enter(self, backend: Backend) -> Entered:
        calls = _counts_for(backend).calls
        key = (self.site, self.nth)
        n = calls.get(key, 0) + 1
        calls[key] = n
        return True, n if n % self.every == 0 else 0

    def entered(self, need: _Need, synced: object) -> tuple[bool, object]:
        raise AssertionError("barrier_after decides without waiting")  # (enter has no need)

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> Exited:
        if not state:
            return None
        call = cast(int, state)
        return _Meet(backend, self.kind, self.site, False, self.timeout, None, exc, call=call)


Policy = MainFirst | OnMainOnly | BarrierAfter


def decorator(policy: Policy) -> str:
    """How the decorator that made ``policy`` is written, with the options
    that decide what it does."""
    options = []
    if isinstance(policy, OnMainOnly) and policy.broadcast:
        options.append("broadcast=True")
        if policy.share:
            options.append("share=True")
    if isinstance(policy, BarrierAfter) and policy.every != 1:
        options.append(f"every={policy.every}")
    if policy.local:
        options.append("local=True")
    return f"@{policy.kind}({', '.join(options)})" if options else f"@{policy.kind}"


def compose(policies: Sequence[Policy], target: str) -> tuple[Policy, ...]:
    """The policies a stack (outermost first) runs, or CompositionError for a
    stack that could only deadlock.

    ``main_first`` right over ``on_main_only(broadcast=True)`` on the same
    ranks adds nothing: the broadcast already has the others wait for the
    main rank's result, and they never run the body, so it is dropped.
    Each ``barrier_after`` gets its place among those of its site (its
    ``nth``, counted from the innermost), so that it counts its own calls."""
    kept = [
        p
        for i, p in enumerate(policies)
        if not (i + 1 < len(policies) and _adds_nothing(p, policies[i + 1]))
    ]
    _refuse_deadlocks(kept, target)
    seen: dict[Site, int] = {}
    for i in reversed(range(len(kept))):
        policy = kept[i]
        if isinstance(policy, BarrierAfter):
            nth = seen.get(policy.site, 0)
            seen[policy.site] = nth + 1
            if policy.nth != nth:
                kept[i] = replace(policy, nth=nth)
    return tuple(kept)


def _adds_nothing(outer: Policy, inner: Policy) -> bool:
    return (
        isinstance(outer, MainFirst)
        and isinstance(inner, OnMainOnly)
        and inner.broadcast
        and inner.local == outer.local
    )


def _deadlocks(outer: Policy, inner: Policy) -> bool:
    """Whether ``outer`` stacked right over ``inner`` can only deadlock."""
    if not isinstance(outer, (MainFirst, OnMainOnly)) or not inner.syncs:
        return False
    if isinstance(outer, MainFirst) and isinstance(inner, MainFirst):
        return inner.local != outer.local  # same ranks: the inner one is a no-op
    return not _adds_nothing(outer, inner)


# What a stack means, for the fix a CompositionError suggests.
_MEANS: Final = {
    ("barrier_after", "on_main_only"): "the main rank runs it, then every rank meets "
    "(the main rank saves, everybody waits for it)",
    ("barrier_after", "on_main_only(broadcast)"): "the main rank runs it, every rank gets "
    "its result, then all meet",
    ("barrier_after", "main_first"): "every rank runs it, the main rank first, then all meet",
    ("main_first", "on_main_only"): "the main rank runs it while the others wait, then they "
    "return the default",
    ("on_main_only(broadcast)", "on_main_only"): "the main rank runs it and every rank gets "
    "its result (the inner @on_main_only then adds nothing: drop it)",
}


def _family(policy: Policy) -> str:
    if isinstance(policy, OnMainOnly) and policy.broadcast:
        return "on_main_only(broadcast)"
    return policy.kind


def _refuse_deadlocks(policies: Sequence[Policy], target: str) -> None:
    for i, outer in enumerate(policies):
        for inner in policies[i + 1 :]:
            if not _deadlocks(outer, inner):
                continue
            if isinstance(outer, OnMainOnly):
                why = (
                    "runs its body only on the main rank, so the inner sync point would "
                    "wait forever for the others"
                )
            else:
                why = (
                    "runs its body on the main rank while the others wait, so the inner "
                    "sync point would pair the main rank with the others' wait"
                )
            o, n = decorator(outer), decorator(inner)
            if _adds_nothing(inner, outer):
                fix = (
                    f"Drop {n}: {o} already has the other ranks wait for the main rank, "
                    f"and they never run the body"
                )
            elif _deadlocks(inner, outer):
                if isinstance(outer, MainFirst) and isinstance(inner, MainFirst):
                    keep = (
                        "@main_first(local=True) alone lets each node's LOCAL_RANK 0 go "
                        "first, @main_first alone rank 0"
                    )
                else:
                    keep = "each of them already has the other ranks wait for a main rank"
                fix = (
                    f"{o} and {n} cannot be stacked in either order: keep one of them "
                    f"({keep}), or call two functions one after the other"
                )
            else:
                means = _MEANS.get((_family(inner), _family(outer)), "")
                fix = f"Put {n} above {o} (outermost first)" + (
                    f": {n} over {o} means '{means}'" if means else ""
                )
            raise CompositionError(f"{o} over {n} on {target}: {o} {why}. {fix}.")


def _shared(policy: Policy, exc: BaseException | None, result: object, synced: object) -> object:
    # On the main rank of on_main_only(broadcast=True, share=True), the
    # result the node's ranks share replaces the body's own.
    if exc is None and isinstance(policy, OnMainOnly) and policy.share:
        return unshare(synced)
    return result


# -- the skeleton of a call under policies, and its two drivers ------------------


@final
class _Body:
    """What :func:`around` yields where the body runs."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BODY"


BODY: Final = _Body()

Outcome: TypeAlias = "tuple[object, BaseException | None]"
"""What a step, the body or a whole call gave: its value, or the exception it raised."""

Around: TypeAlias = "Generator[_Need | _Body, Outcome, Outcome]"


def around(policies: Sequence[Policy], backend: Backend) -> Around:
    """A call under ``policies`` (outermost first), as steps: the one
    skeleton that functions, coroutines, ``with`` and ``async with`` blocks
    share.

    It yields each thing that may block (a need) and :data:`BODY` where the
    body runs, receives the outcome of each, and returns the call's outcome.
    Each policy that entered has its exit run, innermost first, with the
    exception so far; a policy may skip the body with a value.  It never
    blocks, waits or raises by itself: :func:`advance` drives it in this
    thread, :func:`advance_async` in an event loop, and the caller runs the
    body and raises what the call raised (so no frame of it lies on the
    raise path)."""
    entered: list[tuple[Policy, object]] = []
    result: object = None
    exc: BaseException | None = None
    for policy in policies:
        try:
            decided = policy.enter(backend)
        except BaseException as error:
            exc = error
            break
        if isinstance(decided, _NEEDS):  # the one need it has before it decides
            synced, exc = yield decided  # outside any try: closing it just ends it
            if exc is not None:
                break
            try:
                decided = policy.entered(decided, synced)
            except BaseException as error:
                exc = error
                break
        go, state = decided
        if not go:
            result = state
            break
        entered.append((policy, state))
    else:
        result, exc = yield BODY
    while entered:
        policy, state = entered.pop()
        try:
            need = policy.exit(backend, state, exc, result)
        except BaseException as error:
            exc = error
            continue
        if need is None:
            continue
        synced, failed = yield need
        if failed is not None:
            exc = failed
            continue
        try:
            result = _shared(policy, exc, result, synced)
        except BaseException as error:
            exc = error
    return result, exc


def advance(
    steps: Around, outcome: Outcome | None, caller: FrameType | None = None
) -> Outcome | None:
    """Drive ``steps`` in this thread, blocking where it waits, from
    ``outcome`` (None at the start; the body's outcome after :data:`BODY`):
    returns None where the body is to run, else the call's outcome.
    ``caller``, the frame that called a decorated function, goes with each
    sync point, whose messages then name the call's file and line."""
    while True:
        try:
            need = steps.send(outcome)  # type: ignore[arg-type]  # None starts it
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if need is BODY:
            return None
        try:
            outcome = _do(need, caller), None  # type: ignore[arg-type]
        except BaseException as error:
            outcome = None, error


async def advance_async(
    steps: Around, outcome: Outcome | None, caller: FrameType | None = None
) -> Outcome | None:
    """:func:`advance` in an event loop: what blocks runs in the worker
    thread while the loop runs its other tasks.  The one difference is here:
    ``await _do_async(need, caller)`` for ``_do(need, caller)``."""
    while True:
        try:
            need = steps.send(outcome)  # type: ignore[arg-type]  # None starts it
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if need is BODY:
            return None
        try:
            outcome = await _do_async(need, caller), None  # type: ignore[arg-type]
        except BaseException as error:
            outcome = None, error
