"""A session (one per process group) starts and stops its threads itself,
and acts on ranks seen to end in one place.  One process, a real TCPStore of
its own (port 0 on loopback), no process group: multi-rank behaviour is
tested on real ranks in test_deathwatch.py, test_exits.py and
test_multinode.py."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

dist = pytest.importorskip("torch.distributed")

from syncdeco._plane import exits  # noqa: E402
from syncdeco._plane.exchange import Place  # noqa: E402
from syncdeco._plane.session import Session  # noqa: E402


@pytest.fixture
def store() -> Iterator[Any]:
    server = dist.TCPStore(
        "127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30), wait_for_workers=False
    )
    yield server


def _session(store: Any, *, rank: int = 1) -> Session:
    # Rank 1 of 2, alone on its node: it hosts nothing, and the node's
    # other ranks never register, so its finder keeps looking until stopped.
    return Session(store.clone(), rank, 2, Place("here", 0, 2), {}, spare=store)


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_a_session_starts_nothing_until_started_and_stop_ends_its_watch_threads(
    store: Any,
) -> None:
    before = _threads()
    session = _session(store)
    assert _threads() == before, "making a session started a thread"
    session.start()
    try:
        started = {t.name for t in _threads() - before}
        assert {"syncdeco-stacks", "syncdeco-find-node"} <= started, started
        assert session.finder is not None and session.finder.is_alive()
    finally:
        session.stop()
    assert not session.finder.is_alive()  # joined: out of any store call
    assert session.stopping.is_set()
    responder = session.responder
    assert responder is not None
    responder.close(ring=store.clone())  # wake it now rather than at exit


def test_a_session_replaced_by_another_closes_its_own(store: Any) -> None:
    first, second = _session(store), _session(store)
    first.start()
    second.start(first)
    try:
        assert first.stopping.is_set() and not second.stopping.is_set()
        assert first.finder is not None
        first.finder.join(timeout=10)  # it ends at its next look
        assert not first.finder.is_alive()
        assert second.store_watch is first.store_watch  # the same store: watched once
        # ... and its news goes to the session that replaced the first
        on_lost = second.store_watch.on_lost
        assert isinstance(on_lost, functools.partial) and on_lost.args[0]() is second
    finally:
        second.stop()
        for made in (first, second):
            assert made.responder is not None
            made.responder.close(ring=store.clone())


def _told(store: Any, rank: int) -> bool:
    # The key that settles who reports a rank's end (see exits.say_exit).
    return bool(store.check([f"syncdeco/gone/{rank}"]))


class _Unreachable:
    """A store whose host has gone: every request fails."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise dist.DistNetworkError("Connection reset by peer")

        return fail


def test_a_loss_outside_a_sync_point_waits_for_the_next(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With fail-fast off: on, it would end this process (test_failfast.py
    # tests that on real ranks).
    monkeypatch.setenv("SYNCDECO_FAIL_FAST", "0")
    session = _session(store, rank=0)
    loss = (exits.killed_failure(1), None)
    session.seen([loss])
    assert session.deaths == [loss]  # noted, nothing told yet
    assert not _told(store, 1)
    session.report_deaths(_Unreachable())  # a report that fails keeps it
    assert session.deaths == [loss]
    # What TorchBackend.sync does first at this rank's next sync point:
    session.report_deaths(session.exchange.store)
    assert session.deaths == []
    assert _told(store, 1)


def test_a_loss_inside_a_sync_point_is_told_at_once(store: Any) -> None:
    session = _session(store, rank=0)
    failure = exits.killed_failure(1)
    with session.exchange.lock:  # as while a sync point runs
        session.seen([(failure, None)])
    assert session.deaths == []
    assert _told(store, 1)


def test_a_rank_that_said_it_leaves_notes_no_loss(store: Any) -> None:
    session = _session(store, rank=0)
    session.leave(None)
    session.seen([(exits.killed_failure(1), None)])
    assert session.deaths == []
    assert not _told(store, 1)
