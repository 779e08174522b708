"""Policies: what a decorator or context manager does before and after the
code it wraps, and on which ranks.

A policy is a small frozen value.  A stack of syncdeco decorators is one
wrapper holding a tuple of policies (outermost first); :func:`run` and
:func:`run_async` drive such a tuple around one call.  Each policy has two
halves, ``enter`` (before the body: go on, or skip it with a value) and
``exit`` (after the body, or after the body raised).  A half that may
block (join the process group, meet the other ranks) returns a generator
that yields what it needs done and receives its result: :func:`drive` does
that in place; :func:`drive_async` hands it to syncdeco's worker thread and
awaits it, so an event loop runs its other tasks while its rank waits.  A
half that cannot block returns plainly.  The same policy code serves
functions, coroutines, ``with`` and ``async with`` blocks.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, NamedTuple, TypeAlias, TypeVar, final

from . import _trace
from ._backend import Backend, Failure, SyncPoint, Timeout, resolve_timeout
from ._errors import CompositionError, SyncError
from ._plane.share import Share, unshare

__all__ = [
    "BarrierAfter",
    "Entered",
    "Exited",
    "MainFirst",
    "OnMainOnly",
    "Policy",
    "Site",
    "Steps",
    "compose",
    "decorator",
    "drive",
    "drive_async",
    "enter",
    "enter_async",
    "leave",
    "leave_async",
    "meet",
    "run",
    "run_async",
]

R = TypeVar("R")
T = TypeVar("T")

_log = logging.getLogger("syncdeco")


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
    where: str


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


def _arrive(backend: Backend, kind: str, site: Site, local: bool) -> SyncPoint:
    """This rank's next arrival at a sync point: checked (not inside a body
    that runs on the main rank only) and counted, in the caller's thread."""
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
    return SyncPoint(kind, site.name, count, site.location)


def _sync(
    backend: Backend,
    point: SyncPoint,
    local: bool,
    failure: Failure | None,
    payload: object,
    seconds: float | None,
) -> object:
    """Wait at ``point`` (blocks: in async code it runs in the worker thread)."""
    worker = _worker
    if worker is not None and worker.pending and threading.current_thread() is not worker.thread:
        # Reached in the program's own thread: after the async sync points
        # this rank reached before it (a cancelled task's may still wait).
        worker.drain()
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


# -- what a policy needs done, and the drivers that do it ----------------------


class _Meet(NamedTuple):
    """Meet the other ranks at the sync point ``kind`` at ``site``.

    ``prepare``: join the backend's group first (the first time, that may
    block).  ``reporting``: tell the others this rank raised it (the caller
    re-raises it).  A tuple: made on every decorated call that syncs."""

    backend: Backend
    kind: str
    site: Site
    local: bool
    timeout: Timeout
    payload: object = None
    reporting: BaseException | None = None
    prepare: bool = False


class _Prepare(NamedTuple):
    """Join the backend's group before the main rank runs a body that ends
    at the sync point ``at``."""

    at: _Meet


_Need: TypeAlias = "_Prepare | _Meet"
Steps: TypeAlias = Generator[_Need, object, T]
"""A policy half: yields what may block, receives its result, returns its own."""


def _do(need: _Need) -> object:
    if isinstance(need, _Prepare):
        _prepare(need.at.backend)
        return None
    backend, kind, site, local, timeout, payload, exc, prepare = need
    if prepare:
        _prepare(backend)
    point = _arrive(backend, kind, site, local)
    if exc is None:
        return _sync(backend, point, local, None, payload, resolve_timeout(timeout))
    try:
        _sync(backend, point, local, _failure(backend, exc), None, resolve_timeout(timeout))
    except SyncError as problem:
        exc.add_note(f"syncdeco: while telling the other ranks about this error: {problem}")
    return None


def drive(steps: Steps[T]) -> T:
    """Run a policy half in this thread, blocking where it waits."""
    try:
        need = next(steps)
        while True:
            need = steps.send(_do(need))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def drive_async(steps: Steps[T]) -> T:
    """Run a policy half in an event loop: what blocks runs in the worker
    thread, and the loop runs other tasks meanwhile."""
    try:
        need = next(steps)
        while True:
            need = steps.send(await _do_async(need))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _prepare_once(backend: Backend) -> None:
    _prepare(backend)
    _counts_for(backend).prepared = True


async def _do_async(need: _Need) -> object:
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
            await _off_loop(functools.partial(_prepare_once, backend), None)
        except asyncio.CancelledError as cancelled:
            # Cancelled before its body: the others hear so at its sync point.
            await _do_async(need.at._replace(reporting=cancelled))
            raise
        return None
    backend, exc = need.backend, need.reporting
    prepare = need.prepare and not _counts_for(backend).prepared
    if need.prepare and not prepare:
        _prepare(backend)
    try:
        point = _arrive(backend, need.kind, need.site, need.local)
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
            return await _off_loop(call, what)
        if isinstance(exc, asyncio.CancelledError):
            # A cancelled task does not wait: it gets its CancelledError now,
            # and its report goes out in the background, in order.
            _the_worker().submit(call, what, None, None)
        else:
            await _off_loop(call, what)
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


# -- the worker thread of async sync points ----------------------------------------

# (rank, sync point) of a job, for the log when nobody is left to hear its error
_What: TypeAlias = "tuple[int, SyncPoint] | None"


@final
class _Worker:
    """A daemon thread that runs the blocking half of async sync points, one
    at a time, in the order the event loops reached them.

    A task cancelled while its sync point waits gets ``CancelledError`` at
    once; the sync point itself still completes here, so this rank stays in
    step with the others: its next sync point runs after it, here or, when
    reached in the program's own thread, once :meth:`drain` returns.  A
    daemon, so that a wait left behind never holds up the interpreter's
    exit (syncdeco's exit notice still reaches the other ranks)."""

    __slots__ = ("idle", "jobs", "pending", "thread")

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[
            tuple[contextvars.Context, Callable[[], object], Any, Any, _What]
        ] = queue.SimpleQueue()
        self.pending = 0  # jobs submitted and not yet run to their end
        self.idle = threading.Condition(threading.Lock())
        self.thread = threading.Thread(
            target=_serve, args=(self,), name="syncdeco-async", daemon=True
        )
        self.thread.start()

    def submit(self, call: Callable[[], object], what: _What, loop: Any, future: Any) -> None:
        """Run ``call``; settle ``future`` (an asyncio future of ``loop``) with
        its outcome, or log its error if there is no future."""
        with self.idle:
            self.pending += 1
        self.jobs.put((contextvars.copy_context(), call, loop, future, what))

    def done(self) -> None:
        """A job has run to its end."""
        with self.idle:
            self.pending -= 1
            if not self.pending:
                self.idle.notify_all()

    def drain(self) -> None:
        """Wait until no job is left to run: those submitted so far, and any
        submitted meanwhile (each sync point ends by its own timeout, or
        when the others hear this rank exit)."""
        with self.idle:
            self.idle.wait_for(lambda: not self.pending)


def _serve(worker: _Worker) -> None:
    while True:
        context, call, loop, future, what = worker.jobs.get()
        error: BaseException | None = None
        value: object = None
        try:
            value = context.run(call)
        except BaseException as exc:
            error = exc
        finally:
            worker.done()
        if future is None:
            _orphaned(what, error)
        else:
            try:
                loop.call_soon_threadsafe(_settle, future, value, error, what)
            except RuntimeError:  # its event loop is closed: nobody is left to hear
                _orphaned(what, error)
        del context, call, loop, future, value, error


def _settle(future: Any, value: object, error: BaseException | None, what: _What) -> None:
    if future.cancelled():  # its task was cancelled while it waited
        _orphaned(what, error)
    elif error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _orphaned(what: _What, error: BaseException | None) -> None:
    if error is None or what is None:
        return
    rank, point = what
    _log.warning(
        "rank %d: %s was reached by an asyncio task that was cancelled (or whose "
        "event loop closed) before it ended; it completed in the background, with "
        "%s: %s",
        rank,
        point.describe(),
        type(error).__name__,
        error,
        extra={"rank": rank},
    )


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _the_worker() -> _Worker:
    global _worker
    worker = _worker
    if worker is None:
        with _worker_lock:
            if _worker is None:
                _worker = _Worker()
            worker = _worker
    return worker


def _forget_worker_in_child() -> None:
    # A forked child has no worker thread: it starts its own when it needs one.
    global _worker, _worker_lock
    _worker = None
    _worker_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_worker_in_child)


async def _off_loop(call: Callable[[], object], what: _What) -> object:
    """``call()`` in the worker thread, awaited without blocking the loop."""
    import asyncio  # imported by whoever runs an event loop; not at import time

    loop = asyncio.get_running_loop()
    future = loop.create_future()
    _the_worker().submit(call, what, loop, future)
    return await future


def _is_main(backend: Backend, local: bool) -> bool:
    return (backend.local_rank() if local else backend.rank()) == 0


_SKIP: Final = object()  # state of a policy that decided to do nothing

# What a policy half returns: ``enter`` its decision (go on?, state) or the
# steps that reach it; ``exit`` the one sync point it meets at, if any.  A
# half that never waits returns plainly, so a call that does not sync (such
# as ``barrier_after(every=N)`` between meetings) makes no generator.
Entered: TypeAlias = "tuple[bool, object] | Steps[tuple[bool, object]]"
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
        return self._first(backend)

    def _first(self, backend: Backend) -> Steps[tuple[bool, object]]:
        at = _Meet(backend, self.kind, self.site, self.local, self.timeout, prepare=True)
        if _is_main(backend, self.local):
            yield _Prepare(at)
        else:
            yield at
        return True, _region.set(_Region(self.kind, self.local, str(self.site)))

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
        if self.broadcast:
            return self._broadcast(backend)
        if not _is_main(backend, self.local):
            return False, self.default
        return True, _region.set(_Region(self.kind, self.local, str(self.site)))

    def _broadcast(self, backend: Backend) -> Steps[tuple[bool, object]]:
        at = _Meet(backend, self.kind, self.site, self.local, self.timeout, prepare=True)
        if not _is_main(backend, self.local):
            return False, unshare((yield at))  # the main rank's result
        yield _Prepare(at)
        return True, _region.set(_Region(self.kind, self.local, str(self.site)))

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
    each decorator of a stack counts the calls it sees."""

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
        return True, n % self.every == 0

    def exit(
        self, backend: Backend, state: object, exc: BaseException | None, result: object
    ) -> Exited:
        if not state:
            return None
        return _Meet(backend, self.kind, self.site, False, self.timeout, None, exc)


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


def enter(policy: Policy, backend: Backend) -> tuple[bool, object]:
    """``policy.enter``, waiting in this thread if it must."""
    decided = policy.enter(backend)
    return decided if isinstance(decided, tuple) else drive(decided)


async def enter_async(policy: Policy, backend: Backend) -> tuple[bool, object]:
    """``policy.enter``, waiting in the worker thread if it must."""
    decided = policy.enter(backend)
    return decided if isinstance(decided, tuple) else await drive_async(decided)


def leave(
    policy: Policy, backend: Backend, state: object, exc: BaseException | None, result: object
) -> object:
    """``policy.exit``, waiting in this thread if it must; returns the
    result the call gives (the body's, or, for ``share=True``, the one in
    shared memory)."""
    need = policy.exit(backend, state, exc, result)
    if need is not None:
        return _shared(policy, exc, result, _do(need))
    return result


async def leave_async(
    policy: Policy, backend: Backend, state: object, exc: BaseException | None, result: object
) -> object:
    """``policy.exit``, waiting in the worker thread if it must; returns
    what :func:`leave` does."""
    need = policy.exit(backend, state, exc, result)
    if need is not None:
        return _shared(policy, exc, result, await _do_async(need))
    return result


def _shared(policy: Policy, exc: BaseException | None, result: object, synced: object) -> object:
    # On the main rank of on_main_only(broadcast=True, share=True), the
    # result the node's ranks share replaces the body's own.
    if exc is None and isinstance(policy, OnMainOnly) and policy.share:
        return unshare(synced)
    return result


def run(policies: Sequence[Policy], backend: Backend, body: Callable[[], R]) -> R:
    """Call ``body`` under ``policies`` (outermost first)."""
    entered: list[tuple[Policy, object]] = []
    exc: BaseException | None = None
    result: object = None
    try:
        for policy in policies:
            go, state = enter(policy, backend)
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
    while entered:
        policy, state = entered.pop()
        try:
            result = leave(policy, backend, state, exc, result)
        except BaseException as error:
            exc = error
    if exc is not None:
        raise exc
    return result  # type: ignore[return-value]


async def run_async(
    policies: Sequence[Policy], backend: Backend, body: Callable[[], Awaitable[R]]
) -> R:
    """:func:`run` for a coroutine function: the loop runs other tasks while
    this one waits at a sync point."""
    entered: list[tuple[Policy, object]] = []
    exc: BaseException | None = None
    result: object = None
    try:
        for policy in policies:
            go, state = await enter_async(policy, backend)
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
    while entered:
        policy, state = entered.pop()
        try:
            result = await leave_async(policy, backend, state, exc, result)
        except BaseException as error:
            exc = error
    if exc is not None:
        raise exc
    return result  # type: ignore[return-value]
