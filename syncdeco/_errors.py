"""The exceptions syncdeco raises.

Every error names what happened, on which rank, at which sync point, and
what to do about it.  All of them derive from :class:`SyncError` except
:class:`CompositionError`, which is a programming mistake found when
decorating (it derives from both ``SyncError`` and ``TypeError``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeVar, final

__all__ = [
    "CompositionError",
    "PeerFailedError",
    "RankExitedError",
    "RankKilledError",
    "RankLostError",
    "SyncError",
    "SyncMismatchError",
    "SyncTimeoutError",
    "shown",
]

E = TypeVar("E", bound=BaseException)

# syncdeco's own source files: every module of the package lies under it.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
FULL_TRACEBACK = "SYNCDECO_FULL_TRACEBACK"


def shown(exc: E) -> E:
    """``exc``, ready to be raised by the frame of syncdeco that the user's
    call entered: the entries of its traceback in syncdeco's own frames,
    from where it was raised up to the first frame of other code (the
    user's body, torch), are dropped, so that the traceback shows the
    user's call, that one frame, and the error (or the frames it came
    through).  An exception that is not syncdeco's own and was raised in
    syncdeco's frames (a bug of syncdeco's) keeps them all: they are where
    to look.

    ``__cause__``, ``__context__`` and ``.remote_traceback`` are kept.
    ``SYNCDECO_FULL_TRACEBACK=1`` in the environment keeps every frame
    (for debugging syncdeco itself)."""
    tb = exc.__traceback__
    if tb is None or os.environ.get(FULL_TRACEBACK, "") not in ("", "0"):
        return exc
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    if tb is None and not (isinstance(exc, SyncError) or type(exc).__module__ == "syncdeco"):
        return exc
    return exc.with_traceback(tb)


class SyncError(RuntimeError):
    """Base class of every error raised at a syncdeco sync point."""

    __module__ = "syncdeco"
    _kwargs: dict[str, object] | None = None

    def __reduce__(self) -> str | tuple[object, ...]:
        # Errors built from keyword arguments pickle by those arguments, so
        # they survive multiprocessing and the pytest-xdist boundary intact.
        if self._kwargs is None:
            return super().__reduce__()
        return (_from_kwargs, (type(self), self._kwargs))


class PeerFailedError(SyncError):
    """Another rank raised inside a synced region.

    ``rank`` is the rank that failed, ``exc_type`` the name of its exception
    type, ``message`` its ``str()``, ``remote_traceback`` its formatted
    traceback, and ``point`` the sync point where this rank heard of it.
    ``raised_at`` is the sync point where the failing rank reported it, when
    that was another one (the ranks were out of step: ``out_of_step``).
    The failing rank itself re-raises its own exception instead.
    """

    __module__ = "syncdeco"

    def __init__(
        self,
        *,
        rank: int,
        exc_type: str,
        message: str,
        remote_traceback: str,
        point: str,
        observer: int,
        raised_at: str | None = None,
    ) -> None:
        self._kwargs = dict(
            rank=rank,
            exc_type=exc_type,
            message=message,
            remote_traceback=remote_traceback,
            point=point,
            observer=observer,
            raised_at=raised_at,
        )
        self.rank = rank
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.point = point
        self.observer = observer
        self.raised_at = None if raised_at == point else raised_at
        super().__init__(self._describe())

    def _describe(self) -> str:
        elsewhere = "" if self.raised_at is None else f"; rank {self.rank} was at {self.raised_at}"
        return (
            f"rank {self.rank} raised {self.exc_type}: {self.message} (seen by rank "
            f"{self.observer} at {self.point}{elsewhere}). Rank {self.rank}'s own log has "
            f"the full error; its traceback is in .remote_traceback."
        )

    @property
    def out_of_step(self) -> bool:
        """Whether the failing rank was at another sync point than this one:
        it will not come to this rank's next sync point in step."""
        return self.raised_at is not None


class RankExitedError(PeerFailedError):
    """Another rank's process ended before reaching this sync point: its
    program returned or called ``sys.exit()``, or an exception escaped it.
    ``exc_type`` and ``message`` describe that exception, and are empty when
    the process ended without one.  The others hear of it as soon as they
    wait for it.  A process killed by a signal, or ended by ``os._exit()``,
    cannot say so: :class:`RankKilledError` is raised when a rank on its
    host sees it end.
    """

    __module__ = "syncdeco"

    def _describe(self) -> str:
        rank = self.rank
        if self.exc_type:
            error = f"{self.exc_type}: {self.message}" if self.message else self.exc_type
            why = (
                f"an uncaught {error} ended its process. Rank {rank}'s own log has the "
                f"full error; its traceback is in .remote_traceback."
            )
        else:
            why = (
                "its program ended without an uncaught exception (it returned or called "
                "sys.exit(); its exit status and log say whether that was an error). If "
                "it was not, the ranks do not reach the same sync points: check that every "
                "rank makes the same sync calls (decorated calls, sd.barrier) as often as "
                "the others."
            )
        return (
            f"rank {rank} exited without reaching this sync point (seen by rank "
            f"{self.observer} at {self.point}): {why}"
        )

    @property
    def out_of_step(self) -> bool:
        return True  # it is gone


class RankKilledError(RankExitedError):
    """Another rank's process ended without running Python's exit handlers:
    a signal (SIGKILL, the out-of-memory killer, SIGSEGV and other crashes)
    or ``os._exit()``.  The ranks on its host see it end through the kernel
    and tell the others; a rank alone on its host cannot be watched (the
    others then learn of it at their timeout)."""

    __module__ = "syncdeco"

    def _describe(self) -> str:
        return (
            f"rank {self.rank} exited without reaching this sync point (seen by rank "
            f"{self.observer} at {self.point}): its process ended without running "
            f"Python's exit handlers, which is what a signal such as SIGKILL or the "
            f"out-of-memory killer, a crash (SIGSEGV), or os._exit() does. Its exit "
            f"status (in the launcher's log) and the kernel log (dmesg: 'Out of "
            f"memory: Killed process') say which."
        )


@final
class RankLostError(RankKilledError):
    """Another rank was lost with its whole host: nothing has been heard
    from that host for several seconds (power loss, a kernel panic, a cut
    link, a GPU that took the machine down), so its ranks cannot say they
    are gone and the kernel sends no reset.  ``host`` is the lost host's
    name (or the store's address, when the job's store went with it) and
    ``ranks`` the ranks that ran there.  Every rank waiting at a sync point
    raises it within about 10 s of the loss, whatever the timeout."""

    __module__ = "syncdeco"

    def __init__(
        self,
        *,
        rank: int,
        host: str,
        ranks: Sequence[int],
        point: str,
        observer: int,
        store: bool = False,
    ) -> None:
        self.host = host
        self.ranks = tuple(ranks)
        self.store = store
        super().__init__(
            rank=rank,
            exc_type="",
            message="",
            remote_traceback="",
            point=point,
            observer=observer,
        )
        self._kwargs = dict(
            rank=rank, host=host, ranks=self.ranks, point=point, observer=observer, store=store
        )

    def _describe(self) -> str:
        ranks = ", ".join(map(str, self.ranks or (self.rank,)))
        plural = "s" if "," in ranks else ""
        what = (
            f"the job's store at {self.host} stopped answering (no reply to TCP keepalive "
            f"probes): its host is down or cut off from this one, with rank{plural} {ranks}"
            if self.store
            else f"host {self.host} was lost with rank{plural} {ranks} (nothing heard from it "
            f"for several seconds: power loss, a kernel panic, a cut link or a crashed machine)"
        )
        return (
            f"rank{plural} {ranks} lost (seen by rank {self.observer} at {self.point}): "
            f"{what}. The job cannot go on without {'them' if plural else 'it'}: end it and "
            f"restart from the last checkpoint once the host is back or replaced (torchrun "
            f"--max-restarts does so by itself; under a scheduler, a requeue the job sets "
            f"up)."
        )


# A missing rank's place (``SyncTimeoutError.places``) where no stack
# responder runs in its process: it has not reached a sync point yet (or
# has exited), and sd.init() at its start would have it answer.
NO_RESPONDER: Final = "did not answer: no stack responder runs in its process"


@final
class SyncTimeoutError(SyncError, TimeoutError):
    """Not every rank reached a sync point within its timeout.

    ``missing`` lists the ranks that did not arrive (as seen from this rank);
    ``last_seen`` maps each of them to the last sync point it was seen at, or
    None if it was never seen at one.  ``stacks`` maps each of them to the
    Python stack of its main thread when the sync point gave up (fetched
    from that rank itself), or to why it could not answer; ``places`` says
    the same in a few words (the innermost frame of the user's code).
    """

    __module__ = "syncdeco"

    def __init__(
        self,
        *,
        missing: Sequence[int],
        point: str,
        timeout: float,
        observer: int,
        last_seen: Mapping[int, str | None] | None = None,
        stacks: Mapping[int, str] | None = None,
        places: Mapping[int, str] | None = None,
    ) -> None:
        self.missing = tuple(missing)
        self.last_seen = dict(last_seen or {})
        self.stacks = dict(stacks or {})
        self.places = dict(places or {})
        self.point = point
        self.timeout = timeout
        self.observer = observer
        self._kwargs = dict(
            missing=self.missing,
            point=point,
            timeout=timeout,
            observer=observer,
            last_seen=self.last_seen,
            stacks=self.stacks,
            places=self.places,
        )
        if observer in self.missing:
            ranks = rank_ranges(self.missing)
            super().__init__(
                f"rank {observer} reached {point} too late: the other ranks had given "
                f"up waiting ({timeout:g}s); late rank(s): {ranks}. Find what slowed "
                f"rank {observer} down, or pass a larger timeout= (None waits forever)."
            )
            return
        ranks = rank_ranges(self.missing)
        # Ranks said of alike (a thousand not started, say) are said of once.
        alike: dict[tuple[str, str], list[int]] = {}
        for r in sorted(self.missing):
            if r in self.last_seen or r in self.places:
                seen = _seen(self.last_seen[r]) if r in self.last_seen else ""
                alike.setdefault((seen, self.places.get(r, "")), []).append(r)
        each = "; ".join(
            (
                f"rank {rs[0]}{seen}" + (f" {place}" if place else "")
                if len(rs) == 1
                else f"ranks {rank_ranges(rs)}{seen}" + (f": each {place}" if place else "")
            )
            for (seen, place), rs in alike.items()
        )
        said = f": {each.rstrip('.')}." if each else "."
        more = " Their stacks, or why none came, are in .stacks." if self.stacks else ""
        early = (
            " A rank never seen at a sync point cannot say where it is (it answers "
            "from its first one on): call sd.init() at the start of every rank's "
            "program to have it located."
            if any(
                self.last_seen.get(r, "") is None
                and self.places.get(r, NO_RESPONDER).startswith(NO_RESPONDER)
                for r in self.missing
            )
            else ""
        )
        super().__init__(
            f"rank {observer} waited {timeout:g}s at {point} but rank(s) {ranks} did "
            f"not arrive{said}{more} Check those ranks' logs for a crash or a slow step, "
            f"or pass a larger timeout= (timeout=None waits forever).{early}"
        )


def rank_ranges(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 4, 6, 7]`` as ``"0-2, 4, 6-7"``."""
    runs: list[list[int]] = []
    for r in sorted(set(ranks)):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def whereabouts(rank: int, seen: str | None) -> str:
    """``rank`` with the last sync point it was seen at (for messages)."""
    return f"{rank}{_seen(seen)}"


def _seen(seen: str | None) -> str:
    return f" (last seen at {seen})" if seen else " (never seen at a sync point)"


@final
class SyncMismatchError(SyncError):
    """Ranks met at different sync points.

    ``points`` maps each sync point description to the ranks found there.
    """

    __module__ = "syncdeco"

    def __init__(self, *, points: dict[str, tuple[int, ...]], observer: int) -> None:
        self._kwargs = dict(points=dict(points), observer=observer)
        self.points = dict(points)
        self.observer = observer
        where = "; ".join(
            f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))} at {p}"
            for p, r in self.points.items()
        )
        super().__init__(
            f"ranks reached different sync points ({where}); seen by rank "
            f"{observer}. Every rank must pass the same sync points in the same "
            f"order: look for a branch that depends on the rank or on data."
        )


@final
class CompositionError(SyncError, TypeError):
    """A decorator stack or a nested sync point that could only deadlock."""

    __module__ = "syncdeco"


def _from_kwargs(cls: type[SyncError], kwargs: dict[str, object]) -> SyncError:
    return cls(**kwargs)
