"""Single-process tests: decorating, composing, validating, choosing a
backend, and the errors themselves.  Nothing here starts a process group."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import syncdeco as sd
from syncdeco._decorate import _Fused
from syncdeco._env import detect_launch

# -- what can be decorated ---------------------------------------------------------


def add(a: int, b: int = 2) -> int:
    """Add two numbers."""
    return a + b


DECORATORS = [
    pytest.param(sd.main_first, id="main_first"),
    pytest.param(sd.main_first(local=True), id="main_first(local)"),
    pytest.param(sd.on_main_only, id="on_main_only"),
    pytest.param(sd.on_main_only(broadcast=True), id="on_main_only(broadcast)"),
    pytest.param(sd.barrier_after, id="barrier_after"),
    pytest.param(sd.barrier_after(every=3), id="barrier_after(every)"),
]


@pytest.mark.parametrize("deco", DECORATORS)
def test_function_keeps_signature_name_doc(deco: object) -> None:
    wrapped = deco(add)  # type: ignore[operator]
    assert wrapped(1) == 3 and wrapped(1, b=5) == 6
    assert inspect.signature(wrapped) == inspect.signature(add)
    assert wrapped.__name__ == "add" and wrapped.__doc__ == "Add two numbers."
    assert wrapped.__wrapped__ is add


@pytest.mark.parametrize("deco", DECORATORS)
def test_methods_classmethods_staticmethods(deco: object) -> None:
    d = deco  # type: ignore[assignment]

    class Model:
        scale = 10

        def __init__(self) -> None:
            self.offset = 1

        @d
        def method(self, x: int) -> int:
            return x + self.offset

        @d
        @classmethod
        def inner_classmethod(cls, x: int) -> int:
            return x * cls.scale

        @classmethod
        @d
        def outer_classmethod(cls, x: int) -> int:
            return x * cls.scale

        @d
        @staticmethod
        def inner_staticmethod(x: int) -> int:
            return -x

        @staticmethod
        @d
        def outer_staticmethod(x: int) -> int:
            return -x

    m = Model()
    assert m.method(1) == 2
    assert Model.method(m, 1) == 2
    assert Model.inner_classmethod(2) == 20 == m.inner_classmethod(2)
    assert Model.outer_classmethod(2) == 20 == m.outer_classmethod(2)
    assert Model.inner_staticmethod(3) == -3 == m.inner_staticmethod(3)
    assert Model.outer_staticmethod(3) == -3 == m.outer_staticmethod(3)
    assert list(inspect.signature(m.method).parameters) == ["x"]


@pytest.mark.parametrize("deco", DECORATORS)
def test_async_stays_a_coroutine_function(deco: object) -> None:
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    wrapped = deco(fetch)  # type: ignore[operator]
    assert inspect.iscoroutinefunction(wrapped)
    assert asyncio.run(wrapped(21)) == 42
    assert inspect.signature(wrapped) == inspect.signature(fetch)


@pytest.mark.parametrize("deco", DECORATORS)
def test_generators_are_refused(deco: object) -> None:
    def gen() -> Iterator[int]:
        yield 1

    async def agen():  # type: ignore[no-untyped-def]
        yield 1

    for target in (gen, agen):
        with pytest.raises(sd.CompositionError, match="generator") as info:
            deco(target)  # type: ignore[operator]
        assert isinstance(info.value, TypeError)


FACES = ("main_first", "on_main_only", "barrier_after")


def _names_only(message: str, face: str) -> None:
    """The message is about ``face``: it names it, and no other decorator."""
    assert face in message
    assert [f for f in FACES if f in message.replace(face, "")] == []


@pytest.mark.parametrize(
    "call, face, expected",
    [
        (lambda: sd.barrier_after(5), "barrier_after", "@barrier_after(every=5)"),
        (lambda: sd.barrier_after("step"), "barrier_after", "@barrier_after(name='step')"),
        (lambda: sd.main_first(True), "main_first", "@main_first(local=True)"),
        (lambda: sd.main_first(30.0), "main_first", "@main_first(timeout=30.0)"),
        (lambda: sd.on_main_only(True), "on_main_only", "@on_main_only(broadcast=True)"),
        (lambda: sd.on_main_only(broadcast=True)(7), "on_main_only", "@on_main_only(timeout=7)"),
        (lambda: sd.main_first()(None), "main_first", "@main_first(local=True)"),
    ],
)
def test_non_callables_are_refused_naming_the_decorator_and_its_options(
    call: object, face: str, expected: str
) -> None:
    options = {
        "main_first": "local=, name=, timeout=",
        "barrier_after": "every=, name=, timeout=",
        "on_main_only": "broadcast=, default=, local=, name=, share=, timeout=",
    }[face]
    with pytest.raises(TypeError, match="keywords only") as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert message.startswith(f"@{face} decorates functions and methods, not ")
    assert expected in message and f"the options of {face} are {options}." in message
    _names_only(message, face)


@pytest.mark.parametrize("deco", DECORATORS)
def test_a_property_is_refused_with_the_fix(deco: object) -> None:
    face = str(getattr(deco, "__name__", None) or repr(deco).split("(")[0])
    with pytest.raises(TypeError) as info:
        deco(property(lambda self: 1))  # type: ignore[operator]
    assert str(info.value) == (
        f"@{face} cannot wrap a property: decorate its getter function instead, "
        f"with @property above @{face} (outermost first)."
    )

    class Model:
        @property
        @deco  # type: ignore[misc]
        def size(self) -> int:
            return 3

    assert Model().size == 3  # the fix works


# -- stacking ------------------------------------------------------------------------


def test_stacked_decorators_fuse_into_one_wrapper() -> None:
    @sd.barrier_after
    @sd.main_first
    @sd.on_main_only
    def load() -> int:
        return 5

    assert isinstance(load, _Fused)
    assert not isinstance(load.__wrapped__, _Fused)  # one layer, not three
    assert [p.kind for p in load._self_stack.policies] == [
        "barrier_after",
        "main_first",
        "on_main_only",
    ]
    assert load() == 5


def _stack(*decorators: object, body: Callable[[], object] | None = None) -> Any:
    def f() -> object:
        return body() if body is not None else None

    for deco in reversed(decorators):
        f = deco(f)  # type: ignore[operator]
    return f


@pytest.mark.parametrize(
    "outer, inner, fix",
    [
        (
            sd.on_main_only,
            sd.barrier_after,
            "Put @barrier_after above @on_main_only (outermost first): @barrier_after "
            "over @on_main_only means 'the main rank runs it, then every rank meets",
        ),
        (
            sd.on_main_only,
            sd.main_first,
            "Put @main_first above @on_main_only (outermost first): @main_first over "
            "@on_main_only means 'the main rank runs it while the others wait, then they "
            "return the default'.",
        ),
        (
            sd.on_main_only,
            sd.on_main_only(broadcast=True),
            "Put @on_main_only(broadcast=True) above @on_main_only (outermost first): "
            "@on_main_only(broadcast=True) over @on_main_only means 'the main rank runs "
            "it and every rank gets its result",
        ),
        (
            sd.on_main_only(broadcast=True),
            sd.barrier_after(every=3),
            "Put @barrier_after(every=3) above @on_main_only(broadcast=True) (outermost "
            "first): @barrier_after(every=3) over @on_main_only(broadcast=True) means 'the "
            "main rank runs it, every rank gets its result, then all meet'.",
        ),
        (
            sd.main_first,
            sd.barrier_after,
            "Put @barrier_after above @main_first (outermost first): @barrier_after over "
            "@main_first means 'every rank runs it, the main rank first, then all meet'.",
        ),
        (
            sd.on_main_only(broadcast=True),
            sd.main_first,
            "Drop @main_first: @on_main_only(broadcast=True) already has the other ranks "
            "wait for the main rank",
        ),
        # refused in both orders: the fix says so instead of suggesting the other
        (
            sd.main_first,
            sd.main_first(local=True),
            "@main_first and @main_first(local=True) cannot be stacked in either order: "
            "keep one of them",
        ),
        (
            sd.main_first(local=True),
            sd.main_first,
            "@main_first(local=True) and @main_first cannot be stacked in either order",
        ),
        (
            sd.main_first,
            sd.on_main_only(broadcast=True, local=True),
            "@main_first and @on_main_only(broadcast=True, local=True) cannot be stacked "
            "in either order",
        ),
        (
            sd.on_main_only(broadcast=True),
            sd.on_main_only(broadcast=True),
            "cannot be stacked in either order",
        ),
    ],
)
def test_stacks_that_can_only_deadlock_are_refused(outer: object, inner: object, fix: str) -> None:
    with pytest.raises(sd.CompositionError) as info:
        _stack(outer, inner)
    message = str(info.value)
    assert fix in message
    assert " on _stack.<locals>.f: " in message
    # the stack it names is the one written, with the options that matter
    o, i = message.split(" on _stack")[0].split(" over ")
    assert o.split("(")[0] == f"@{_face_of(outer)}" and i.split("(")[0] == f"@{_face_of(inner)}"
    if "Put " in fix:  # the suggested order is accepted
        _stack(inner, outer)
    if "Drop " in fix:
        _stack(outer)


def _face_of(deco: object) -> str:
    name = getattr(deco, "__name__", None)
    return str(name) if name else repr(deco).split("(")[0]


class _RankOfTwo:
    """Rank ``rank`` of a two-rank job: logs each sync point it reaches, in
    order with the body's runs, and answers an on_main_only sync point of a
    member with the main rank's broadcast result."""

    def __init__(self, rank: int, events: list[str]) -> None:
        self._rank = rank
        self.events = events

    def rank(self) -> int:
        return self._rank

    def world_size(self) -> int:
        return 2

    def local_rank(self) -> int:
        return self._rank

    def sync(self, point: sd.SyncPoint, **kw: object) -> object:
        self.events.append(point.kind)
        return "main's result" if point.kind == "on_main_only" else None


BA, MF, OMO = "barrier_after", "main_first", "on_main_only"


@pytest.mark.parametrize(
    "decorators, policies, on_main, on_member, member_gets",
    [
        # the main rank saves, everybody waits
        ((sd.barrier_after, sd.on_main_only), [BA, OMO], ["body", BA], [BA], None),
        (
            (sd.barrier_after, sd.on_main_only(broadcast=True)),
            [BA, OMO],
            ["body", OMO, BA],
            [OMO, BA],
            "main's result",
        ),
        (
            (sd.barrier_after, sd.main_first),
            [BA, MF],
            ["body", MF, BA],
            [MF, "body", BA],
            "result",
        ),
        # the inner main_first, on the same ranks, is inside the outer's turn
        ((sd.main_first, sd.main_first), [MF, MF], ["body", MF], [MF, "body"], "result"),
        ((sd.main_first, sd.on_main_only), [MF, OMO], ["body", MF], [MF], None),
        (
            (sd.barrier_after(every=10), sd.barrier_after),
            [BA, BA],
            ["body", BA],
            ["body", BA],
            "result",
        ),
        (
            (sd.barrier_after, sd.main_first, sd.on_main_only(broadcast=True)),
            [BA, OMO],  # main_first over a broadcast adds nothing: dropped
            ["body", OMO, BA],
            [OMO, BA],
            "main's result",
        ),
    ],
)
def test_stacks_that_work_are_accepted(
    decorators: tuple[object, ...],
    policies: list[str],
    on_main: list[str],
    on_member: list[str],
    member_gets: object,
) -> None:
    events: list[str] = []

    def body() -> str:
        events.append("body")
        return "result"

    f = _stack(*decorators, body=body)
    assert isinstance(f, _Fused) and not isinstance(f.__wrapped__, _Fused)  # one wrapper
    assert [p.kind for p in f._self_stack.policies] == policies
    with sd.use_backend(_RankOfTwo(0, events)):
        assert f() == "result"
    assert events == on_main
    events.clear()
    with sd.use_backend(_RankOfTwo(1, events)):
        assert f() == member_gets
    assert events == on_member
    events.clear()
    assert f() == "result" and events == ["body"]  # one process: a plain call


@pytest.mark.parametrize("outer, inner", [(4, 2), (2, 4), (10, 1), (3, 3)])
def test_each_barrier_after_of_a_stack_counts_its_own_calls(outer: int, inner: int) -> None:
    events: list[str] = []
    f = _stack(sd.barrier_after(every=outer), sd.barrier_after(every=inner))
    with sd.use_backend(_RankOfTwo(0, events)):
        for call in range(1, 13):
            before = len(events)
            f()
            assert len(events) - before == (call % inner == 0) + (call % outer == 0), call
    assert set(events) == {BA}
    # with the Null backend in between: no meet and no count
    f()
    with sd.use_backend(_RankOfTwo(0, events)):
        events.clear()
        f()  # call 13 of each
        assert events == [BA] * (13 % inner == 0) + [BA] * (13 % outer == 0)


class _Points(_RankOfTwo):
    """Rank 0 of two that keeps each sync point as reached."""

    def __init__(self) -> None:
        super().__init__(0, [])
        self.points: list[sd.SyncPoint] = []

    def sync(self, point: sd.SyncPoint, **kw: object) -> object:
        self.points.append(point)
        return super().sync(point, **kw)


def test_a_barrier_after_sync_point_is_described_by_the_call_that_meets() -> None:
    backend = _Points()
    step = sd.barrier_after(every=5)(lambda: None)
    stacked = _stack(sd.barrier_after(every=4), sd.barrier_after(every=2))
    with sd.use_backend(backend):
        for _ in range(12):
            step()
        assert [(p.count, p.call) for p in backend.points] == [(1, 5), (2, 10)]
        assert "(call 10, " in backend.points[-1].describe()
        backend.points.clear()
        for _ in range(8):
            stacked()
    # inner (every=2) at calls 2, 4, 6, 8; outer (every=4) after it at 4 and 8;
    # each sync point its own count (the two share the function's name)
    assert [p.call for p in backend.points] == [2, 4, 4, 6, 8, 8]
    assert [p.count for p in backend.points] == [1, 2, 3, 4, 5, 6]


def test_functions_that_share_a_name_meet_by_their_count_of_meetings() -> None:
    # One rank saves with full() twice, the other with full() then light():
    # one sync point named "save" each time, so they agree (the calls differ).
    ranks = [_Points(), _Points()]
    for backend, light_second in zip(ranks, (False, True), strict=True):
        full = sd.barrier_after(name="save")(lambda: None)
        light = sd.barrier_after(name="save")(lambda: None)
        with sd.use_backend(backend):
            full()
            (light if light_second else full)()
    ids = [[(p.kind, p.name, p.count) for p in b.points] for b in ranks]
    assert ids[0] == ids[1] == [("barrier_after", "save", 1), ("barrier_after", "save", 2)]
    assert [p.call for p in ranks[1].points] == [1, 1]


def test_barrier_after_calls_are_counted_per_stack_not_per_name() -> None:
    events: list[str] = []
    a = sd.barrier_after(every=2, name="step")(lambda: None)
    b = sd.barrier_after(every=2, name="step")(lambda: None)
    with sd.use_backend(_RankOfTwo(0, events)):
        a()
        b()
        assert events == []  # one call each so far
        a()
        assert events == [BA]


class _Scripted:
    """Rank 0 of two: records each sync point with the failure it reports,
    and raises ``error`` (a SyncError) at every sync point if given."""

    def __init__(self, error: sd.SyncError | None = None) -> None:
        self.error = error
        self.log: list[tuple[str, str | None]] = []

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 2

    def local_rank(self) -> int:
        return 0

    def sync(self, point: sd.SyncPoint, **kw: Any) -> object:
        failure = kw["failure"]
        self.log.append((point.kind, failure.exc_type if failure else None))
        if self.error is not None:
            raise self.error
        return None


def _through_each_face(body_raises: bool, backend: _Scripted) -> list[object]:
    """The same barrier_after around the same body, as a function, a
    coroutine, a with block and an async with block: what each raised or
    returned, and the notes on it."""

    def body() -> str:
        if body_raises:
            raise ValueError("bad shard")
        return "done"

    async def body_async() -> str:
        return body()

    def in_with() -> str:
        with sd.barrier_after():
            return body()

    async def in_async_with() -> str:
        async with sd.barrier_after():
            return body()

    faces: list[Callable[[], object]] = [
        sd.barrier_after(body),
        lambda: asyncio.run(sd.barrier_after(body_async)()),
        in_with,
        lambda: asyncio.run(in_async_with()),
    ]
    seen: list[object] = []
    with sd.use_backend(backend):
        for face in faces:
            try:
                seen.append(face())
            except Exception as exc:
                seen.append((type(exc).__name__, str(exc), getattr(exc, "__notes__", [])))
    return seen


@pytest.mark.parametrize("body_raises", [False, True])
@pytest.mark.parametrize("sync_raises", [False, True])
def test_functions_coroutines_and_with_blocks_share_one_skeleton(
    body_raises: bool, sync_raises: bool
) -> None:
    error = sd.SyncError("rank 1 is gone") if sync_raises else None
    backend = _Scripted(error)
    seen = _through_each_face(body_raises, backend)
    assert all(outcome == seen[0] for outcome in seen), seen
    assert backend.log == [("barrier_after", "ValueError" if body_raises else None)] * 4
    if body_raises:  # the body's error goes on; a failure to report it is a note
        notes = ["syncdeco: while telling the other ranks about this error: rank 1 is gone"]
        assert seen[0] == ("ValueError", "bad shard", notes if sync_raises else [])
    elif sync_raises:
        assert seen[0] == ("SyncError", "rank 1 is gone", [])
    else:
        assert seen[0] == "done"


def test_main_first_over_a_broadcast_adds_nothing() -> None:
    @sd.barrier_after
    @sd.main_first
    @sd.on_main_only(broadcast=True)
    def vocab() -> dict[str, int]:
        return {"a": 1}

    assert [p.kind for p in vocab._self_stack.policies] == ["barrier_after", "on_main_only"]
    assert vocab() == {"a": 1}
    with pytest.raises(sd.CompositionError):
        sd.main_first(local=True)(sd.on_main_only(broadcast=True)(vocab.__wrapped__))


def test_decorated_calls_on_the_null_backend_are_plain_calls() -> None:
    # One process has nothing to coordinate: the wrapper calls straight
    # through (the run-time CompositionError for a sync point inside an
    # on_main_only body is raised on real ranks, see test_ranks.py).
    @sd.on_main_only
    def save() -> str:
        sd.barrier("inner")
        return "saved"

    assert save() == "saved"

    rec = _Recording()

    @sd.on_main_only
    def save_on(backend: object) -> None:
        sd.barrier("inner")

    with sd.use_backend(rec), pytest.raises(sd.CompositionError, match=r"'inner'.*on_main_only"):
        save_on(rec)  # a one-rank backend that is not Null still checks


def test_main_first_with_block_nested_in_main_first_function() -> None:
    @sd.main_first
    def outer() -> int:
        with sd.main_first():
            return 1

    assert outer() == 1


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda: sd.barrier_after(every=0), ValueError, "every"),
        (lambda: sd.barrier_after(every=1.5), TypeError, "every"),
        (lambda: sd.main_first(timeout=-1), ValueError, "positive"),
        (lambda: sd.main_first(timeout="10"), TypeError, "timeout"),
        (lambda: sd.on_main_only(name=3), TypeError, "name"),
        (lambda: sd.on_main_only(broadcast=True, default=0), TypeError, "default"),
        (lambda: sd.main_first(local="yes"), TypeError, "local"),
        (lambda: sd.main_first(locale=True), TypeError, "locale"),
        (lambda: sd.barrier(timeout=0), ValueError, "positive"),
    ],
)
def test_bad_options_fail_when_decorating(call: object, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    "call, error, start",
    [
        (lambda: sd.barrier_after(every=0), ValueError, "barrier_after(every=0): every="),
        (lambda: sd.barrier_after(every=True), TypeError, "barrier_after(every=True): every="),
        (lambda: sd.barrier_after(name=1), TypeError, "barrier_after(name=1): name="),
        (lambda: sd.barrier_after(timeout="1"), TypeError, "barrier_after(timeout=...)"),
        (lambda: sd.main_first(local=1), TypeError, "main_first(local=1): local="),
        (lambda: sd.main_first(timeout=-1), ValueError, "main_first(timeout=...) must be "),
        (lambda: sd.main_first(name=b"x"), TypeError, "main_first(name=b'x'): name="),
        (lambda: sd.on_main_only(broadcast=1), TypeError, "on_main_only(broadcast=1): "),
        (lambda: sd.on_main_only(local=None), TypeError, "on_main_only(local=None): local="),
        (lambda: sd.on_main_only(timeout=0), ValueError, "on_main_only(timeout=...) must be"),
        (lambda: sd.on_main_only(name=3), TypeError, "on_main_only(name=3): name="),
        (lambda: sd.barrier(name=3), TypeError, "barrier(name=3): name="),
        (lambda: sd.barrier(print), TypeError, "barrier(<built-in function print>): barrier is"),
        (lambda: sd.barrier(timeout=0), ValueError, "barrier(timeout=...) must be positive"),
    ],
)
def test_option_errors_name_their_decorator(call: object, error: type, start: str) -> None:
    with pytest.raises(error) as info:
        call()  # type: ignore[operator]
    assert str(info.value).startswith(start)
    face = start.split("(")[0]
    if face != "barrier":
        _names_only(str(info.value), face)


@pytest.mark.parametrize("deco", DECORATORS)
def test_generator_refusal_names_the_decorator(deco: object) -> None:
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(sd.CompositionError) as info:
        deco(numbers)  # type: ignore[operator]
    face = _face_of(deco)
    assert str(info.value).startswith(f"@{face} cannot wrap ")
    _names_only(str(info.value), face)


def test_a_sync_point_inside_a_main_only_body_says_how_to_fix_it() -> None:
    rec = _Recording()

    @sd.barrier_after
    def step() -> None: ...

    @sd.main_first
    def load() -> None:
        step()

    @sd.on_main_only
    def save() -> None:
        sd.barrier("inner")

    with sd.use_backend(rec):
        with pytest.raises(sd.CompositionError) as info:
            load()
        assert "Move the sync point out of that body: stack @barrier_after above " in str(
            info.value
        )
        assert "@main_first instead of calling it inside." in str(info.value)
        with pytest.raises(sd.CompositionError) as info:
            save()
        assert "call sd.barrier() before or after the on_main_only function" in str(info.value)


# -- the Null backend ----------------------------------------------------------------------


def test_null_backend_runs_everything_locally() -> None:
    assert isinstance(sd.get_backend(), sd.NullBackend)
    assert (sd.rank(), sd.world_size(), sd.local_rank(), sd.is_main(), sd.is_main(local=True)) == (
        0,
        1,
        0,
        True,
        True,
    )

    @sd.on_main_only(broadcast=True)
    def vocab() -> dict[str, int]:
        return {"a": 1}

    @sd.on_main_only(default=-1)
    def log() -> int:
        return 7

    assert vocab() == {"a": 1} and log() == 7
    with sd.main_first():
        pass
    with sd.barrier_after(every=2):
        pass
    assert sd.barrier() is None


def test_exceptions_pass_through_unchanged() -> None:
    @sd.barrier_after
    @sd.main_first
    def boom() -> None:
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        boom()
    with pytest.raises(KeyError):
        with sd.main_first():
            raise KeyError("x")


class _Recording:
    def __init__(self) -> None:
        self.points: list[sd.SyncPoint] = []
        self.failures: list[Any] = []  # what each sync point carried, where one did

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def local_rank(self) -> int:
        return 0

    def sync(self, point: sd.SyncPoint, **kw: object) -> object:
        self.points.append(point)
        if kw.get("failure") is not None:
            self.failures.append(kw["failure"])
        return kw["payload"]


def test_user_backend_sees_named_counted_sync_points() -> None:
    rec = _Recording()
    assert isinstance(rec, sd.Backend)

    @sd.barrier_after(every=2)
    def step() -> None: ...

    with sd.use_backend(rec):
        for _ in range(4):
            step()
        sd.barrier("ckpt")
    assert [(p.kind, p.count, p.call) for p in rec.points] == [
        ("barrier_after", 1, 2),  # its meetings, and the calls that meet
        ("barrier_after", 2, 4),
        ("barrier", 1, 0),
    ]
    assert rec.points[0].name.endswith(
        "test_user_backend_sees_named_counted_sync_points.<locals>.step"
    )
    assert rec.points[0].location.startswith("test_single.py:")
    assert rec.points[2].name == "ckpt"


class _Loader:
    """A callable object, decorated as an instance."""

    def __call__(self, shard: int) -> int:
        return shard


def _load(shard: int, size: int) -> int:
    return shard * size


def test_a_partial_and_a_callable_object_are_named_alike_on_every_rank() -> None:
    # Their repr holds an address that differs from process to process: a
    # name made from it would make every rank meet at a different point.
    rec = _Recording()
    with sd.use_backend(rec):
        sd.barrier_after(functools.partial(_load, size=4))(1)
        sd.barrier_after(_Loader())(2)
    partial, loader = rec.points
    assert partial.name == f"{__name__}._load" and "0x" not in partial.name
    assert partial.location.startswith("test_single.py:")
    assert loader.name == f"{__name__}._Loader.__call__" and "0x" not in loader.name
    assert loader.location.startswith("test_single.py:")


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("bad str")


def test_an_exception_whose_str_fails_still_reaches_the_sync_point() -> None:
    # Its rank must still meet the others and tell them, not raise on the
    # way there (they would wait for it until their timeout).
    rec = _Recording()

    @sd.barrier_after
    def step() -> None:
        raise _Unprintable

    with sd.use_backend(rec), pytest.raises(_Unprintable):
        step()
    assert len(rec.points) == 1
    (failure,) = rec.failures
    assert failure.exc_type == "_Unprintable"
    said = "<str() of the exception raised RuntimeError: RuntimeError('bad str')>"
    assert failure.message == said
    assert "_Unprintable" in failure.traceback


def test_use_backend_nests_and_restores() -> None:
    a, b = _Recording(), sd.NullBackend()
    with sd.use_backend(a):
        with sd.use_backend(b):
            assert sd.get_backend() is b
        assert sd.get_backend() is a
    assert isinstance(sd.get_backend(), sd.NullBackend)
    with pytest.raises(TypeError, match="Backend"):
        with sd.use_backend("gloo"):  # type: ignore[arg-type]
            pass


def test_init_sets_backend_and_default_timeout() -> None:
    backend = sd.init("null", timeout=5)
    assert isinstance(backend, sd.NullBackend) and sd.get_backend() is backend
    with pytest.raises(ValueError, match="'mpi2'"):
        sd.init("mpi2")
    with pytest.raises(ValueError, match="positive"):
        sd.init(timeout=0)


# -- launcher environments -------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, var",
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT"),
        ({"RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, "MASTER_ADDR"),
        ({"OMPI_COMM_WORLD_RANK": "-1", "OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_RANK"),
        # what Lightning Fabric's launcher gives the processes it starts
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}, r"after fabric\.launch\(\)"),
    ],
)
def test_broken_environment_names_the_variable(
    env: dict[str, str], var: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(sd.LaunchEnvError, match=var):
        detect_launch(env)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(sd.LaunchEnvError, match=var):
        sd.rank()  # found when the backend is chosen, at call time


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {
                "RANK": "3",
                "WORLD_SIZE": "8",
                "LOCAL_RANK": "1",
                "MASTER_ADDR": "n0",
                "MASTER_PORT": "29500",
            },
            ("torchrun", 3, 8, 1, "n0", 29500),
        ),
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_NTASKS": "8",
                "SLURM_STEP_ID": "0",
                "SLURM_LOCALID": "1",
                "MASTER_ADDR": "n0",
                "MASTER_PORT": "1",
            },
            ("SLURM", 5, 8, 1, "n0", 1),
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "MASTER_ADDR": "n1",
                "MASTER_PORT": "2",
            },
            ("Open MPI", 2, 4, 0, "n1", 2),
        ),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "3"},
            ("SLURM", 0, 1, 0, None, None),
        ),
    ],
)
def test_launchers_are_recognised(env: dict[str, str], expected: tuple[object, ...]) -> None:
    launch = detect_launch(env)
    assert launch is not None
    assert (
        launch.launcher,
        launch.rank,
        launch.world_size,
        launch.local_rank,
        launch.master_addr,
        launch.master_port,
    ) == expected


def test_single_task_launch_uses_null_without_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert isinstance(sd.get_backend(), sd.NullBackend)


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_NTASKS": "4"},  # an salloc shell
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"},  # an sbatch script
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "batch"},
        # the batch step by number (older Slurm, newer Slurm), the extern step,
        # and salloc's shell as an interactive step (use_interactive_step)
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "4294967294"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "4294967291"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEPID": "4294967292"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "4294967290"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "\u00b2"},  # not a number
    ],
)
def test_slurm_outside_an_srun_step_is_one_process(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert detect_launch(env) is None
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert isinstance(sd.get_backend(), sd.NullBackend) and sd.world_size() == 1


def test_no_environment_means_null(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert isinstance(sd.get_backend(), sd.NullBackend)


_LATER_GROUP = """
import os, sys
from datetime import timedelta
import torch.distributed as dist
import syncdeco as sd

@sd.barrier_after
def step():
    return sd.get_backend()

assert isinstance(step(), sd.NullBackend)  # the default path, now known plain
assert isinstance(step(), sd.NullBackend)
from syncdeco import _select
assert _select._plain is not _select._NotPlain  # told by the cached check from now on
store = dist.HashStore()
dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
assert type(step()).__name__ == "TorchBackend"  # a group made later is seen at once
dist.destroy_process_group()
backend = sd.get_backend()  # its group is gone: a sync point says so, rank facts stay
assert type(backend).__name__ == "TorchBackend" and sd.world_size() == 1, backend
try:
    sd.barrier("after")
except sd.SyncError as exc:
    print("raised:", exc)
else:
    sys.exit("a barrier after destroy_process_group() did not raise")
"""


def test_the_default_path_follows_a_group_made_after_it_was_found_plain() -> None:
    # In a child: a process group leaves its mark on this process (the last
    # group's rank facts) that other tests must not see.
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _LATER_GROUP], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raised:" in result.stdout, result.stdout


# -- errors ----------------------------------------------------------------------------


def test_errors_carry_facts_and_survive_pickling() -> None:
    errors = [
        sd.PeerFailedError(
            rank=3,
            exc_type="ValueError",
            message="bad",
            remote_traceback="tb",
            point="p",
            observer=1,
        ),
        sd.SyncTimeoutError(missing=(2, 5), point="barrier 'x'", timeout=3.0, observer=0),
        sd.SyncMismatchError(points={"a": (0,), "b": (1, 2)}, observer=1),
        sd.CompositionError("stack"),
    ]
    for err in errors:
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
        assert type(err).__module__ == "syncdeco"
        assert isinstance(err, sd.SyncError)
    peer, timeout, mismatch, comp = errors
    assert "rank 3 raised ValueError: bad" in str(peer)
    assert isinstance(timeout, TimeoutError) and timeout.missing == (2, 5)
    assert "rank(s) 2, 5 did not arrive" in str(timeout)
    assert "rank 0 at a" in str(mismatch) and "ranks 1, 2 at b" in str(mismatch)
    assert isinstance(comp, TypeError)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="Linux with THP only"
)
def test_only_large_receive_buffers_get_huge_page_advice() -> None:
    # Advice is given only where the buffer has a mapping of its own, so it
    # goes away with the buffer instead of staying on the heap.
    import torch

    from syncdeco._plane.wire import receive_buffer

    big = receive_buffer((40 << 20,), torch.uint8, torch.device("cpu"))
    assert "hg" in _vm_flags(big.data_ptr() + (4 << 20))
    small = receive_buffer((8 << 20,), torch.uint8, torch.device("cpu"))
    assert "hg" not in _vm_flags(small.data_ptr() + (4 << 20))
    big[:] = 1  # ordinary, writable memory
    assert int(big[-1]) == 1
