"""The public faces: decorators, context managers and plain calls.

Each face validates its options when decorating and builds a policy; stacked
syncdeco decorators fuse into one :class:`_Fused` wrapper that runs a tuple
of policies around the call.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from types import FrameType, TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    NamedTuple,
    Never,
    NoReturn,
    ParamSpec,
    TypeVar,
    final,
    overload,
)

import wrapt

from . import _policy as policies
from . import _trace
from ._backend import DEFAULT, NullBackend, Timeout, _seconds
from ._errors import CompositionError, shown
from ._policy import (
    Around,
    Outcome,
    Policy,
    Site,
    advance,
    advance_async,
    around,
    compose,
    meet,
)
from ._select import get_backend

__all__ = [
    "BarrierAfter",
    "MainFirst",
    "OnMainOnly",
    "barrier",
    "barrier_after",
    "is_main",
    "local_rank",
    "main_first",
    "on_main_only",
    "rank",
    "world_size",
]

P = ParamSpec("P")
R = TypeVar("R")
D = TypeVar("D")
D_co = TypeVar("D_co", covariant=True)


# -- the fused wrapper ------------------------------------------------------


@final
class _Stack:
    """An immutable tuple of policies (outermost first) and how to run it.

    :meth:`call` and :meth:`call_async` are wrapt's wrappers: they drive
    :func:`~syncdeco._policy.around`, run the body where it says, and raise
    what the call raised themselves, so that no other frame of syncdeco
    lies between the user's call and the raise."""

    __slots__ = ("policies",)

    def __init__(self, policies: tuple[Policy, ...]) -> None:
        self.policies = policies

    def call(
        self,
        wrapped: Callable[..., Any],
        instance: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            backend = get_backend()
        except BaseException as problem:
            failed: BaseException | None = problem
        else:
            if backend.__class__ is NullBackend:  # one process: nothing to coordinate
                return wrapped(*args, **kwargs)
            failed = None
        if failed is not None:  # raised as itself, outside the except clause
            raise shown(failed)
        # (the user's call: its messages name its file and line)
        caller = sys._getframe(1)
        steps = around(self.policies, backend)
        outcome = advance(steps, None, caller)
        if outcome is None:  # the body runs here
            try:
                recorder = _trace.active
                if recorder is None:
                    outcome = wrapped(*args, **kwargs), None
                else:
                    # (a partial, not a lambda: a closure would cost every call
                    # its cells, on the Null backend's path too)
                    body = functools.partial(wrapped, *args, **kwargs)
                    outcome = recorder.body(self.policies[0].site.name, body), None
            except BaseException as exc:
                outcome = None, exc
            outcome = advance(steps, outcome, caller)
            assert outcome is not None, "around() runs the body once"
        result, error = outcome
        if error is not None:
            raise shown(error)
        return result

    async def call_async(
        self,
        wrapped: Callable[..., Any],
        instance: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            backend = get_backend()
        except BaseException as problem:
            failed: BaseException | None = problem
        else:
            if backend.__class__ is NullBackend:
                return await wrapped(*args, **kwargs)
            failed = None
        if failed is not None:  # raised as itself, outside the except clause
            raise shown(failed)
        # The coroutine that awaits this call, if one does (a task made
        # right from the call has the event loop's frame there instead).
        caller: FrameType | None = sys._getframe(1)
        if caller is not None and not caller.f_code.co_flags & inspect.CO_COROUTINE:
            caller = None
        steps = around(self.policies, backend)
        outcome = await advance_async(steps, None, caller)
        if outcome is None:  # the body runs here
            try:
                recorder = _trace.active
                if recorder is None:
                    outcome = await wrapped(*args, **kwargs), None
                else:
                    body = functools.partial(wrapped, *args, **kwargs)
                    outcome = await recorder.body_async(self.policies[0].site.name, body), None
            except BaseException as exc:
                outcome = None, exc
            outcome = await advance_async(steps, outcome, caller)
            assert outcome is not None, "around() runs the body once"
        result, error = outcome
        if error is not None:
            raise shown(error)
        return result


if TYPE_CHECKING:
    _FunctionWrapper = wrapt.FunctionWrapper[..., Any]
else:
    _FunctionWrapper = wrapt.FunctionWrapper


class _Fused(_FunctionWrapper):
    """One wrapper for a whole stack of syncdeco decorators."""

    def __init__(self, wrapped: Any, stack: _Stack, is_async: bool) -> None:
        super().__init__(wrapped, stack.call_async if is_async else stack.call)
        self._self_stack = stack


def _function_of(target: object) -> Any:
    func = target
    while True:
        if isinstance(func, (classmethod, staticmethod)):
            func = func.__func__
        elif isinstance(func, wrapt.ObjectProxy):
            func = func.__wrapped__
        else:
            return func


def _site_of(func: Any, name: str | None) -> Site:
    """Where ``func`` is defined, and the sync point's name: ``name``, or
    the function's module and qualified name, the same on every rank (a
    ``functools.partial`` is named after its function, a callable object
    after its class's ``__call__``: never by its ``repr``, which holds an
    address that differs from process to process)."""
    while isinstance(func, functools.partial):
        func = func.func
    if not hasattr(func, "__qualname__"):  # a callable object
        func = type(func).__call__
    code = getattr(func, "__code__", None)
    location = "<unknown>"
    if code is not None:
        location = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    if name is None:
        module = getattr(func, "__module__", None) or "?"
        name = f"{module}.{getattr(func, '__qualname__', type(func).__qualname__)}"
    return Site(name, location)


def _caller_site(name: str | None, depth: int) -> Site:
    frame = sys._getframe(depth + 1)
    location = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    return Site(name if name is not None else location, location)


@final
class _Face(NamedTuple):
    """A public decorator, for the errors about using it."""

    name: str
    options: tuple[str, ...]  # keyword options, in the order errors list them
    example: str

    def __str__(self) -> str:
        return self.name

    def hint(self, value: object) -> str:
        """How a value passed where the function goes was probably meant."""
        option = None
        if isinstance(value, bool):
            option = "broadcast" if "broadcast" in self.options else "local"
        elif isinstance(value, int) and "every" in self.options:
            option = "every"
        elif isinstance(value, (int, float, timedelta)):
            option = "timeout"
        elif isinstance(value, str):
            option = "name"
        example = f"@{self.name}({option}={value!r})" if option else self.example
        listed = ", ".join(f"{o}=" for o in self.options)
        return (
            f"To pass options, call it with keywords only, e.g. {example}; the options "
            f"of {self.name} are {listed}."
        )


_MAIN_FIRST: Final = _Face("main_first", ("local", "name", "timeout"), "@main_first(local=True)")
_BARRIER_AFTER: Final = _Face(
    "barrier_after", ("every", "name", "timeout"), "@barrier_after(every=100)"
)
_ON_MAIN_ONLY: Final = _Face(
    "on_main_only",
    ("broadcast", "default", "local", "name", "share", "timeout"),
    "@on_main_only(broadcast=True)",
)


def _decorate(target: object, face: _Face, name: str | None, make: Callable[[Site], Policy]) -> Any:
    if isinstance(target, property):
        raise TypeError(
            f"@{face} cannot wrap a property: decorate its getter function instead, "
            f"with @property above @{face} (outermost first)."
        )
    if not (callable(target) or isinstance(target, (classmethod, staticmethod))):
        raise TypeError(
            f"@{face} decorates functions and methods, not {type(target).__name__} "
            f"{target!r}. {face.hint(target)}"
        )
    func = _function_of(target)
    what = getattr(func, "__qualname__", repr(func))
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise CompositionError(
            f"@{face} cannot wrap {what}: it is a generator function, and a "
            f"half-consumed generator leaves ranks out of step. Return a list "
            f"instead, or put the sync point around the loop that consumes it."
        )
    policy = make(_site_of(func, name))
    if isinstance(target, _Fused):
        policies = (policy, *target._self_stack.policies)
        target = target.__wrapped__
    else:
        policies = (policy,)
    return _Fused(target, _Stack(compose(policies, what)), inspect.iscoroutinefunction(func))


def _check_name(face: str, name: object) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"{face}(name={name!r}): name= must be a string or None, not {type(name).__name__}"
        )


def _check_bool(face: _Face, option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{face}({option}={value!r}): {option}= must be True or False")


def _check_timeout(face: str, timeout: Timeout) -> None:
    if timeout is not DEFAULT:
        _seconds(timeout, f"{face}(timeout=...)")


# -- context-manager faces --------------------------------------------------


class _Scoped:
    """Base of the objects that are both a decorator and a context manager
    (``with`` and ``async with``).

    The ``with`` form drives the same steps as a decorated call
    (:func:`~syncdeco._policy.around`), up to the body on entering and on
    from there on leaving; it keeps a small stack of the steps of each entry,
    so the same object may be nested; do not share one across threads, nor
    across tasks that are inside it at the same time."""

    __slots__ = ("_entries", "_name", "_timeout")
    _face: ClassVar[_Face]

    def __init__(self, name: str | None, timeout: Timeout) -> None:
        self._name = name
        self._timeout = timeout
        self._entries: list[tuple[Around, bool]] = []  # (steps, on the Null backend)

    def _policy(self, site: Site) -> Policy:
        raise NotImplementedError

    @overload
    def __call__(
        self, target: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, target: Callable[P, R], /) -> Callable[P, R]: ...
    def __call__(self, target: Callable[P, R], /) -> Callable[P, R]:
        result: Callable[P, R] = _decorate(target, self._face, self._name, self._policy)
        return result

    def __enter__(self) -> None:
        policy = self._policy(_caller_site(self._name, 1))
        backend = get_backend()
        steps = around((policy,), backend)
        error = _not_entered(advance(steps, None))
        if error is not None:
            raise shown(error)
        self._entries.append((steps, backend.__class__ is NullBackend))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        steps, _ = self._entries.pop()
        error = _raised_leaving(advance(steps, (None, exc)), exc)
        if error is not None:
            raise shown(error)
        return False  # the block's own exception, if any, goes on

    async def __aenter__(self) -> None:
        policy = self._policy(_caller_site(self._name, 1))
        backend = get_backend()
        steps = around((policy,), backend)
        null = backend.__class__ is NullBackend
        # The Null backend never waits: no thread hop.
        error = _not_entered(advance(steps, None) if null else await advance_async(steps, None))
        if error is not None:
            raise shown(error)
        self._entries.append((steps, null))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        steps, null = self._entries.pop()
        outcome = (None, exc)
        left = advance(steps, outcome) if null else await advance_async(steps, outcome)
        error = _raised_leaving(left, exc)
        if error is not None:
            raise shown(error)
        return False


# (These return the exception for the face to raise itself: no frame of
# syncdeco beyond the face lies between the user's code and the raise.)


def _not_entered(outcome: Outcome | None) -> BaseException | None:
    """Why a with block's steps did not reach its body (None: they did)."""
    if outcome is None:
        return None
    assert outcome[1] is not None, "a with block cannot be skipped"
    return outcome[1]


def _raised_leaving(outcome: Outcome | None, exc: BaseException | None) -> BaseException | None:
    """What leaving a with block raised, unless it is the block's own
    exception ``exc``, which goes on by itself."""
    assert outcome is not None, "a with block's steps end when it is left"
    error = outcome[1]
    return None if error is exc else error


@final
class MainFirst(_Scoped):
    """What ``main_first(...)`` returns: a decorator, and a context manager
    for ``with`` and ``async with`` blocks (see :func:`main_first`).

    Decorating keeps the function's signature and return type.  As a
    ``with`` block, the main rank runs the block first, the others when it
    has left it; the block is a sync point named by its file and line.
    """

    __module__ = "syncdeco"
    __slots__ = ("_local",)
    _face = _MAIN_FIRST

    def __init__(self, local: bool, name: str | None, timeout: Timeout) -> None:
        super().__init__(name, timeout)
        self._local = local

    def _policy(self, site: Site) -> Policy:
        return policies.MainFirst(site, self._local, self._timeout)

    def __repr__(self) -> str:
        return f"main_first(local={self._local}, name={self._name!r}, timeout={self._timeout!r})"


@final
class BarrierAfter(_Scoped):
    """What ``barrier_after(...)`` returns: a decorator, and a context
    manager for ``with`` and ``async with`` blocks (see
    :func:`barrier_after`).

    Decorating keeps the function's signature and return type.  As a
    ``with`` block, every rank runs the block, then all meet when they
    leave it.
    """

    __module__ = "syncdeco"
    __slots__ = ("_every",)
    _face = _BARRIER_AFTER

    def __init__(self, every: int, name: str | None, timeout: Timeout) -> None:
        super().__init__(name, timeout)
        self._every = every

    def _policy(self, site: Site) -> Policy:
        return policies.BarrierAfter(site, self._every, self._timeout)

    def __repr__(self) -> str:
        return f"barrier_after(every={self._every}, name={self._name!r}, timeout={self._timeout!r})"


@final
class OnMainOnly(Generic[D_co]):
    """What ``on_main_only(...)`` returns: a decorator only (the other
    ranks skip the body, which a ``with`` block cannot do; see
    :func:`on_main_only`).

    ``D_co`` is the type of what the other ranks return: the type of
    ``default`` (``None`` unless given), or ``Never`` with
    ``broadcast=True``, where every rank returns the main rank's result.
    A decorated function returning ``R`` returns ``R | D_co``.
    """

    __module__ = "syncdeco"
    __slots__ = ("_broadcast", "_default", "_local", "_name", "_share", "_timeout")

    def __init__(
        self,
        broadcast: bool,
        default: object,
        local: bool,
        name: str | None,
        timeout: Timeout,
        share: bool = False,
    ) -> None:
        self._broadcast = broadcast
        self._default = default
        self._local = local
        self._name = name
        self._timeout = timeout
        self._share = share

    def _policy(self, site: Site) -> Policy:
        return policies.OnMainOnly(
            site, self._broadcast, self._default, self._local, self._timeout, self._share
        )

    @overload
    def __call__(
        self, target: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R | D_co]]: ...
    @overload
    def __call__(self, target: Callable[P, R], /) -> Callable[P, R | D_co]: ...
    def __call__(self, target: Callable[..., Any], /) -> Any:
        return _decorate(target, _ON_MAIN_ONLY, self._name, self._policy)

    def _refuse_with(self) -> TypeError:
        return TypeError(
            f"{self!r} is a decorator, not a with block: the other ranks would have to "
            f"skip the block's body, which Python cannot do. Put the code in a function "
            f"decorated with @on_main_only (broadcast=True to hand every rank its "
            f"result), or write `if sd.is_main(): ...` followed by sd.barrier()."
        )

    if not TYPE_CHECKING:  # hidden from type checkers: `with on_main_only()` is a type error

        def __enter__(self) -> NoReturn:
            raise self._refuse_with()

        def __exit__(self, *exc: object) -> None:  # pragma: no cover - never entered
            pass

        async def __aenter__(self) -> NoReturn:
            raise self._refuse_with()

        async def __aexit__(self, *exc: object) -> None:  # pragma: no cover - never entered
            pass

    def __repr__(self) -> str:
        return (
            f"on_main_only(broadcast={self._broadcast}, default={self._default!r}, "
            f"local={self._local}, name={self._name!r}, timeout={self._timeout!r}"
            + (", share=True)" if self._share else ")")
        )


# -- main_first ---------------------------------------------------------------


@overload
def main_first(
    target: Callable[P, Coroutine[Any, Any, R]], /
) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def main_first(target: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def main_first(
    target: None = None,
    /,
    *,
    local: bool = False,
    name: str | None = None,
    timeout: Timeout = DEFAULT,
) -> MainFirst: ...
def main_first(
    target: Callable[P, R] | None = None,
    /,
    *,
    local: bool = False,
    name: str | None = None,
    timeout: Timeout = DEFAULT,
) -> Callable[P, R] | MainFirst:
    """The main rank runs the body first; the others wait, then run it too.

    Use it as ``@main_first``, ``@main_first(...)`` or ``with main_first(...):``.
    Every rank returns its own result.  Every rank must reach it: it is a
    sync point.  ``local=True`` does this per node (LOCAL_RANK 0 of each node
    goes first; the others wait only for their own node's main).  If the
    main rank raises, it re-raises and the others raise ``PeerFailedError``
    instead of running the body.  ``name`` names the sync point (default:
    the function's qualified name, or the file and line of the ``with``);
    ``timeout`` is in seconds (None: wait forever; default: ``init``'s).

    On an ``async def`` function, and as ``async with main_first():``, the
    rank waits without blocking the event loop (see :func:`barrier_after`).
    """
    _check_bool(_MAIN_FIRST, "local", local)
    _check_name("main_first", name)
    _check_timeout("main_first", timeout)
    face = MainFirst(local, name, timeout)
    if target is None:
        return face
    return face(target)


# -- barrier_after ------------------------------------------------------------


@overload
def barrier_after(
    target: Callable[P, Coroutine[Any, Any, R]], /
) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def barrier_after(target: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def barrier_after(
    target: None = None, /, *, every: int = 1, name: str | None = None, timeout: Timeout = DEFAULT
) -> BarrierAfter: ...
def barrier_after(
    target: Callable[P, R] | None = None,
    /,
    *,
    every: int = 1,
    name: str | None = None,
    timeout: Timeout = DEFAULT,
) -> Callable[P, R] | BarrierAfter:
    """Every rank runs the body, then all ranks meet.

    Use it as ``@barrier_after``, ``@barrier_after(...)`` or
    ``with barrier_after(...):``.  Every rank must reach it.  With
    ``every=N`` only every Nth call meets (calls N, 2N, ...), for training
    steps.  If a rank raises in the body, it re-raises and every other rank
    raises ``PeerFailedError`` naming it.

    On an ``async def`` function, and as ``async with barrier_after():``,
    the wait runs in syncdeco's worker thread, so the event loop runs its
    other tasks meanwhile.  A task cancelled while it waits gets
    ``CancelledError`` at once, and the sync point still completes in the
    background, so the other ranks are not left waiting; a task cancelled
    before its sync point (in the body) reports ``CancelledError`` there,
    and the others raise ``PeerFailedError`` naming it.
    """
    if isinstance(every, bool) or not isinstance(every, int):
        raise TypeError(
            f"barrier_after(every={every!r}): every= must be a positive int (meet on "
            f"every Nth call)"
        )
    if every < 1:
        raise ValueError(
            f"barrier_after(every={every}): every= must be at least 1 (meet on every Nth call)"
        )
    _check_name("barrier_after", name)
    _check_timeout("barrier_after", timeout)
    face = BarrierAfter(every, name, timeout)
    if target is None:
        return face
    return face(target)


# -- on_main_only -------------------------------------------------------------


@overload
def on_main_only(
    target: Callable[P, Coroutine[Any, Any, R]], /
) -> Callable[P, Coroutine[Any, Any, R | None]]: ...
@overload
def on_main_only(target: Callable[P, R], /) -> Callable[P, R | None]: ...
@overload
def on_main_only(
    target: None = None,
    /,
    *,
    broadcast: Literal[True],
    local: bool = False,
    name: str | None = None,
    share: bool = False,
    timeout: Timeout = DEFAULT,
) -> OnMainOnly[Never]: ...
@overload
def on_main_only(
    target: None = None,
    /,
    *,
    broadcast: Literal[False] = False,
    default: D,
    local: bool = False,
    name: str | None = None,
    timeout: Timeout = DEFAULT,
) -> OnMainOnly[D]: ...
@overload
def on_main_only(
    target: None = None,
    /,
    *,
    broadcast: Literal[False] = False,
    local: bool = False,
    name: str | None = None,
    timeout: Timeout = DEFAULT,
) -> OnMainOnly[None]: ...
def on_main_only(
    target: Callable[P, R] | None = None,
    /,
    *,
    broadcast: bool = False,
    default: object = None,
    local: bool = False,
    name: str | None = None,
    share: bool = False,
    timeout: Timeout = DEFAULT,
) -> Callable[P, R | None] | OnMainOnly[Any]:
    """Only the main rank runs the function.

    Without ``broadcast`` the other ranks return ``default`` at once and
    nothing is communicated, so it is not a sync point.  With
    ``broadcast=True`` every rank must call it: the others wait and every
    rank returns the main rank's result (it must pickle); if the main rank
    raises, the others raise ``PeerFailedError``.  ``local=True`` picks
    LOCAL_RANK 0 of each node as its main.  It is a decorator only: a
    ``with`` block cannot be skipped on the other ranks.  On an ``async
    def`` function the others wait without blocking the event loop (see
    :func:`barrier_after`).

    The tensors of a broadcast result cross the network once per node:
    each node's main rank receives them and hands them to the node's other
    ranks through shared memory.  Each rank still gets its own copy, unless
    ``share=True`` (with ``broadcast=True``, CPU tensors only): then every
    rank of a node gets tensors over the same shared memory (the main rank
    too, instead of the tensors its function returned), so a large result
    costs one copy per node.  A write through such a tensor is seen by the
    node's other ranks (order it with a sync point), never by other nodes.
    The memory goes back to the system when the last rank of the node drops
    its tensors; nothing is left in ``/dev/shm``.  Where ``/dev/shm`` has no
    room for the result (a Docker container's 64 MB), it reaches the node's
    ranks through the store instead, each rank its own copy, and the node's
    main logs a warning once.
    """
    _check_bool(_ON_MAIN_ONLY, "broadcast", broadcast)
    _check_bool(_ON_MAIN_ONLY, "local", local)
    _check_bool(_ON_MAIN_ONLY, "share", share)
    _check_name("on_main_only", name)
    _check_timeout("on_main_only", timeout)
    if broadcast and default is not None:
        raise TypeError(
            "on_main_only(broadcast=True, default=...): with broadcast every rank "
            "returns the main rank's result, so default is never used; drop one."
        )

    if share and not broadcast:
        raise TypeError(
            "on_main_only(share=True) needs broadcast=True: share=True gives every rank "
            "of a node the main rank's broadcast result in the same shared memory, and "
            "without broadcast=True the other ranks get no result at all. Write "
            "@on_main_only(broadcast=True, share=True), or drop share=True."
        )
    face: OnMainOnly[Any] = OnMainOnly(broadcast, default, local, name, timeout, share)
    if target is None:
        return face
    return face(target)


# -- plain calls --------------------------------------------------------------


def barrier(name: str | None = None, *, timeout: Timeout = DEFAULT) -> None:
    """A sync point as a plain call: every rank must call it.

    Named by ``name`` (default: the file and line of the call).  Raises
    ``SyncMismatchError`` if ranks reach different barriers and
    ``SyncTimeoutError`` if some do not arrive within ``timeout``.
    """
    if callable(name):
        raise TypeError(
            f"barrier({name!r}): barrier is a call, not a decorator. To meet after a "
            f"function, decorate it with @sd.barrier_after; else call sd.barrier() "
            f"where every rank meets."
        )
    _check_name("barrier", name)
    _check_timeout("barrier", timeout)
    site = _caller_site(name, 1)
    try:
        meet(get_backend(), "barrier", site, timeout=timeout)
        return
    except BaseException as problem:
        failed = problem
    raise shown(failed)


def rank() -> int:
    """This process's global rank (0 without a distributed job)."""
    return get_backend().rank()


def world_size() -> int:
    """The number of ranks (1 without a distributed job)."""
    return get_backend().world_size()


def local_rank() -> int:
    """This process's rank within its node (0 without a distributed job)."""
    return get_backend().local_rank()


def is_main(*, local: bool = False) -> bool:
    """Whether this is rank 0 (or LOCAL_RANK 0 of its node, with ``local``)."""
    backend = get_backend()
    return (backend.local_rank() if local else backend.rank()) == 0
