"""``sd.trace()``: the block that records every rank's sync points into one
trace file.  Its end is a sync point (``_policy.meet``); the recording and
the files are ``_trace``'s, which the policies read while a block runs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import final

from . import _trace
from ._backend import DEFAULT, Failure
from ._errors import PeerFailedError, SyncError, SyncMismatchError, SyncTimeoutError, shown
from ._policy import Site, meet
from ._select import get_backend

__all__ = ["trace"]

_log = logging.getLogger("syncdeco")


def trace(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """Record every sync point of this block, on every rank, into one Chrome
    trace-event file at ``path`` (open it in https://ui.perfetto.dev or
    chrome://tracing; read it with ``python -m syncdeco summary PATH``).

    Every rank must enter the block, and give the same ``path`` on a
    filesystem the main rank can read.  The end of the block is a sync
    point, so every rank must reach it: each rank writes its part to
    ``PATH.parts/``, the ranks meet, rank 0 merges the parts into ``PATH``,
    and they meet again, so the file is complete when the block is left.

    A rank that leaves the block with an exception still reaches that sync
    point and reports it there: it re-raises its own exception, every rank
    that left normally raises ``PeerFailedError`` (at once, as at any sync
    point), and rank 0 merges the trace all the same.  A rank whose block
    ended in ``SyncTimeoutError`` (a rank may be gone) or
    ``SyncMismatchError`` (the ranks are out of step) does not meet: it
    leaves its part, and ``python -m syncdeco merge PATH`` merges what is
    there.  Writing or merging the file never fails the job: a problem there
    is logged through the ``syncdeco`` logger.

    Recording costs a clock read and a small tuple per sync point and per
    decorated call, kept in memory until the block ends (about 200 bytes
    each): trace a window of a job (an epoch), not a week of it.  Decorated
    calls on the Null backend take a fast path that records nothing.
    """
    return _Trace(Path(path), _caller(2))


def _caller(depth: int) -> str:
    frame = sys._getframe(depth)
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


@final
class _Trace:
    __slots__ = ("location", "recorder", "target")

    def __init__(self, target: Path, location: str) -> None:
        self.target = target
        self.location = location
        self.recorder: _trace.Recorder | None = None

    def __enter__(self) -> None:
        rank = get_backend().rank()
        with _trace.starting:
            if _trace.active is not None:
                raise SyncError(
                    f"rank {rank}: sd.trace({str(self.target)!r}) at {self.location} "
                    f"started while this process is already recording a trace; end "
                    f"that block before starting another one"
                )
            self.recorder = _trace.active = _trace.Recorder()
        # A part left by an earlier block that failed is not this block's.
        with contextlib.suppress(OSError):
            (_trace.parts_dir(self.target) / f"rank{rank}.json").unlink()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        error = self._leave(exc)
        if error is not None:
            raise shown(error)  # from here: one frame of syncdeco's under the block

    def _leave(self, exc: BaseException | None) -> SyncError | None:
        """End the block (left with ``exc``, if any); returns the error
        leaving it raises, if any."""
        _trace.active = None
        recorder = self.recorder
        assert recorder is not None
        backend = get_backend()
        rank, world_size = backend.rank(), backend.world_size()
        try:
            _trace.write_part(self.target, rank, world_size, recorder.chrome_events(rank))
        except OSError as problem:
            _log.warning(
                "rank %d could not write its part of the trace %s: %s",
                rank,
                self.target,
                problem,
                extra={"rank": rank},
            )
        if exc is not None and (
            isinstance(exc, (SyncTimeoutError, SyncMismatchError)) or recorder.unmet
        ):
            self._leave_parts(
                rank,
                "a sync point in it timed out, was mismatched, or heard of a failure "
                "from a rank at another sync point",
            )
            return None
        # The end of the block is a sync point.  A rank leaving it with an
        # exception reports it there, so the others hear at once instead of
        # waiting out the timeout; the ranks go on to the second sync point
        # (the merged file is complete) only if none did.
        site = Site(f"syncdeco.trace({self.target.name})", self.location)
        failure = None if exc is None else Failure.from_exception(rank, exc)
        try:
            meet(backend, "barrier", site, failure=failure, timeout=DEFAULT)
        except SyncTimeoutError as problem:
            if exc is None:
                return problem
            exc.add_note(f"syncdeco: at the end of sd.trace(): {problem}")
            return None
        except SyncError as problem:
            if isinstance(problem, PeerFailedError) and rank == 0:
                # Every rank heard of the failure, but one that was at another
                # sync point writes its part later: _merge says so.
                self._merge(world_size)
            elif not isinstance(problem, PeerFailedError):
                self._leave_parts(rank, f"its end raised {type(problem).__name__}")
            if exc is None:
                return problem  # another rank failed: this one hears where it leaves
            exc.add_note(f"syncdeco: at the end of sd.trace(): {problem}")
            return None
        if rank == 0:
            self._merge(world_size)
        if exc is None:
            try:
                meet(
                    backend, "barrier", Site(f"{site.name} merged", self.location), timeout=DEFAULT
                )
            except SyncError as problem:
                return problem
        return None

    def _leave_parts(self, rank: int, why: str) -> None:
        _log.warning(
            "rank %d: the ranks do not meet to merge the trace %s (%s: they may be out "
            "of step, or one may be gone); merge the parts that are there with: "
            "python -m syncdeco merge %s",
            rank,
            self.target,
            why,
            self.target,
            extra={"rank": rank},
        )

    def _merge(self, world_size: int) -> None:
        try:
            missing = _trace.merge(self.target, world_size=world_size)
        except Exception as problem:  # the trace is diagnostics: never fail the job here
            _log.warning(
                "rank 0 could not merge the trace %s: %s", self.target, problem, extra={"rank": 0}
            )
            return
        if missing:
            _log.warning(
                "rank 0 merged the trace at %s without rank(s) %s: their parts were not "
                "in %s yet. A rank that was at another sync point when this block ended "
                "writes its part when its own block ends; merge again then, with: "
                "python -m syncdeco merge %s. If a part never comes, that rank could not "
                "write it (its log says why), or %s is not on a filesystem every rank "
                "shares.",
                self.target,
                missing,
                _trace.parts_dir(self.target),
                self.target,
                self.target.parent,
                extra={"rank": 0},
            )
