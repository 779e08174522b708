"""syncdeco's worker thread: where the blocking half of an async sync point
runs, so that an event loop runs its other tasks while its rank waits.

One daemon thread per process, started on first need, runs the jobs one at
a time in the order the event loops reached their sync points.
:func:`off_loop` awaits a job; :func:`drain_before_sync` keeps a sync point
reached in the program's own thread after those the worker still runs.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeAlias, final

from ._backend import SyncPoint

__all__ = ["What", "drain_before_sync", "off_loop", "the_worker"]

_log = logging.getLogger("syncdeco")

# (rank, sync point) of a job, for the log when nobody is left to hear its error
What: TypeAlias = "tuple[int, SyncPoint] | None"


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
            tuple[contextvars.Context, Callable[[], object], Any, Any, What]
        ] = queue.SimpleQueue()
        self.pending = 0  # jobs submitted and not yet run to their end
        self.idle = threading.Condition(threading.Lock())
        self.thread = threading.Thread(
            target=_serve, args=(self,), name="syncdeco-async", daemon=True
        )
        self.thread.start()

    def submit(self, call: Callable[[], object], what: What, loop: Any, future: Any) -> None:
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


def _settle(future: Any, value: object, error: BaseException | None, what: What) -> None:
    if future.cancelled():  # its task was cancelled while it waited
        _orphaned(what, error)
    elif error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _orphaned(what: What, error: BaseException | None) -> None:
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


def the_worker() -> _Worker:
    """The worker thread, started on first need."""
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


async def off_loop(call: Callable[[], object], what: What) -> object:
    """``call()`` in the worker thread, awaited without blocking the loop."""
    import asyncio  # imported by whoever runs an event loop; not at import time

    loop = asyncio.get_running_loop()
    future = loop.create_future()
    the_worker().submit(call, what, loop, future)
    return await future


def drain_before_sync() -> None:
    """Called at a sync point: reached in the program's own thread, it comes
    after the async sync points this rank reached before it (a cancelled
    task's may still wait in the worker)."""
    worker = _worker
    if worker is not None and worker.pending and threading.current_thread() is not worker.thread:
        worker.drain()
