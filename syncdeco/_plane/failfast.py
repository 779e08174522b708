"""Ending this rank when a peer is lost outside a sync point ("fail fast").

A rank inside a syncdeco sync point hears of a lost peer from the sync
point, which raises.  A rank elsewhere, in its own ``dist.all_reduce``,
computing or loading data, would wait for the watchdog (NCCL: 10 minutes,
Gloo: 30).  The same watches that tell a sync point (the death watch of a
node's ranks, the node watch of the other nodes' leases, the watch of the
job's store's host) call this module then, and it ends this rank: one error
logged, naming the lost ranks, their host and how they ended; the process
group aborted where that makes a blocked collective raise (NCCL); and the
process ended with :data:`EXIT_CODE`, so that the launcher (torchrun,
SLURM, mpirun) ends the job.

Who hears of a loss: every rank, of its node's ranks (death watch); rank 0
(and under torchrun one more node's main), of the other nodes (node watch);
every rank, of the store's host.  A rank that ends here leaves a note on
its node saying why (in each other rank's inbox) before it ends: its node's other
ranks see it end through their death watch, read the note, and end too,
naming the original loss.  A rank that heard of the loss first hand (not
from a note) also writes its note as the job's loss mark (see
``pulse.mark``), which every node's pulse waits for: each hands it to its
node's main at once, which ends here (:func:`told_by_pulse`), and its
node's other ranks after it, through its note.  So every rank of every
node ends, naming the original loss, moments after the first one.  The
rank whose end ends the job's store waits, before it ends, until every
pulse has heard the mark (moments; 2 s at most).

A rank that exits through Python (a clean exit, or an uncaught exception)
leaves a note too, so a clean exit is never taken for a loss.

The rules are plain functions over plain values (:func:`enabled`,
:func:`loss_from_note`, :func:`loss_from_failure`, :func:`message`); the
action is :func:`end`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol, final

from .. import _proc
from .._backend import Failure, _Config
from .._errors import SyncError
from . import exits
from .frames import load_failure

__all__ = [
    "ENV",
    "EXIT_CODE",
    "Loss",
    "arm",
    "enabled",
    "end",
    "loss_from_failure",
    "loss_from_note",
    "lost_in",
    "message",
    "nodes_lost",
    "not_said",
    "peer_ended",
    "store_host_lost",
    "told_by_pulse",
    "watching",
]

EXIT_CODE: Final = 75  # EX_TEMPFAIL: the job may succeed when launched again
ENV: Final = "SYNCDECO_FAIL_FAST"
_ON: Final = frozenset({"1", "true", "yes", "on"})
_OFF: Final = frozenset({"0", "false", "no", "off"})
_TELL: Final = 0.5  # seconds this rank may spend telling the job's store before it ends
# ... and writing the loss mark, and, on the store's host, waiting until
# every pulse has heard it (2 s at most, see Session.spread)
SPREAD: Final = _TELL + 2.5
_ABORT: Final = 2.0  # seconds an NCCL abort may take before the process ends anyway
_NOTE_AGE: Final = 86400.0  # seconds after which a note of an ended job is removed
_LEFT: Final = "left"  # an inbox on its way out is renamed .left.RANK.PID (see _discard)
_TRIES: Final = 5  # removals of an inbox on its way out, 10 ms apart

_log = logging.getLogger("syncdeco")


# -- the rules, over plain values -------------------------------------------------------


def enabled(option: bool | None, env: Mapping[str, str]) -> bool:
    """Whether fail-fast is on: ``init(fail_fast=...)`` where given, else
    the environment variable :data:`ENV`, else on."""
    if option is not None:
        return option
    value = env.get(ENV)
    if value is None or not value.strip():
        return True
    said = value.strip().lower()
    if said in _ON:
        return True
    if said in _OFF:
        return False
    raise ValueError(
        f"{ENV}={value!r}: expected 1 (end a rank whose peer is lost outside a sync "
        f"point) or 0 (let it wait); or pass syncdeco.init(fail_fast=True/False)"
    )


@final
@dataclass(frozen=True, slots=True)
class Loss:
    """Ranks lost to the job: ``ranks`` on ``host`` ("" where unknown),
    ``how`` they ended (a phrase: "were killed ..."); ``first``: the rank
    (and its host) that heard of it first and ended, where this rank heard
    it from that one."""

    ranks: tuple[int, ...]
    host: str
    how: str
    first: tuple[int, str] | None = None


class Tell(Protocol):
    """What a rank that ends here does with the job's store first (see
    ``Session.spread``): ``note``, the fail-fast note (JSON); ``report``:
    report the ranks seen to end; ``mark``: write the note as the job's
    loss mark, for every node's pulse.  Where the store ends with this
    rank, it also waits until the pulses have heard it."""

    def __call__(self, note: bytes, *, report: bool, mark: bool) -> None: ...


def _silent(note: bytes, *, report: bool, mark: bool) -> None:
    """The :class:`Tell` of a rank whose store is gone."""


_KILLED: Final = (
    "ended without running Python's exit handlers (a signal such as SIGKILL or the "
    "out-of-memory killer, a crash, or os._exit())"
)


def loss_from_failure(failure: Failure, host: str = "") -> Loss:
    """The loss a watch reports as ``failure`` (a killed rank, or a node
    lost with its ranks); ``host``: where the rank ran, if known."""
    if failure.lost_host or failure.lost_ranks:
        ranks = failure.lost_ranks or (failure.rank,)
        how = (
            f"{_were(ranks)} lost with {'its' if len(ranks) == 1 else 'their'} node "
            f"(it went silent: power, a crash, or a cut link)"
        )
        return Loss(tuple(sorted(ranks)), failure.lost_host or host, how)
    if failure.exc_type:
        how = f"exited with {failure.exc_type}: {_first_line(failure.message)}"
        return Loss((failure.rank,), host, how)
    return Loss((failure.rank,), host, _KILLED)


def loss_from_note(rank: int, host: str, note: Mapping[str, Any] | None) -> Loss | None:
    """What the end of ``rank``, a rank of this node (on ``host``), means,
    from the note it left (None: it left none).  None when it is no loss:
    it exited cleanly.  A rank that ended through fail-fast passes its
    loss on: the original ranks are named, and who heard it first."""
    if note is None:
        return Loss((rank,), host, _KILLED)
    if note.get("how") == "fail-fast":
        return _passed_on(note, (rank, host))
    if note.get("clean"):
        return None
    kind, said = str(note.get("exc_type", "")), _first_line(str(note.get("message", "")))
    return Loss((rank,), host, f"exited with {kind}: {said}" if kind else "exited with an error")


def _passed_on(note: Mapping[str, Any], sender: tuple[int, str]) -> Loss:
    """The loss a fail-fast note (from ``sender``, a rank and its host)
    passes on: the original ranks, and the rank that heard it first."""
    first = note.get("first")
    if isinstance(first, list) and len(first) == 2:
        sender = (int(first[0]), str(first[1]))
    ranks = tuple(int(r) for r in note.get("ranks", ()))
    return Loss(ranks, str(note.get("host", "")), str(note.get("said", "")), sender)


def loss_from_mark(note: bytes) -> Loss | None:
    """The loss the job's loss mark carries (see ``pulse``): the fail-fast
    note of the rank that heard of it first (None: not one)."""
    try:
        said = json.loads(note)
    except ValueError:
        return None
    if not isinstance(said, dict) or said.get("how") != "fail-fast":
        return None
    return _passed_on(said, (-1, ""))


def lost_in(note: bytes) -> tuple[int, ...]:
    """The ranks a fail-fast note (JSON, see :func:`end`) names lost."""
    try:
        said = json.loads(note)
        return tuple(int(r) for r in said.get("ranks", ()))
    except (ValueError, TypeError, AttributeError):
        return ()


def _were(ranks: Sequence[int]) -> str:
    return "was" if len(ranks) == 1 else "were"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _ranks(ranks: Sequence[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def _how(loss: Loss) -> str:
    if loss.first is None:
        return loss.how
    rank, host = loss.first
    return f"{loss.how} (rank {rank}, on {host}, heard it first and ended)"


def _describe(loss: Loss) -> str:
    where = f" on {loss.host}" if loss.host else ""
    if not loss.ranks:
        return f"the ranks{where or ' of a host'} {_how(loss)}"
    return f"{_ranks(loss.ranks)}{where} {_how(loss)}"


def message(rank: int, losses: Sequence[Loss]) -> str:
    """The one error a rank logs as it ends (``losses``: what it heard)."""
    said = "; ".join(_describe(loss) for loss in losses)
    return (
        f"syncdeco fail-fast: rank {rank} ends with exit code {EXIT_CODE}: {said}. "
        f"Rank {rank} was outside any syncdeco sync point (in its own collective, "
        f"computing or loading data), where a collective with the lost ranks fails or "
        f"waits for its timeout. Look at the lost ranks' logs and launch the job again "
        f"(torchrun --max-restarts does it for you; under a scheduler, a requeue the job "
        f"sets up); to handle the loss yourself, turn this "
        f"off: syncdeco.init(fail_fast=False) or {ENV}=0."
    )


# -- the action -------------------------------------------------------------------------


class _State:
    lock = threading.Lock()
    ended = False  # a loss is being acted on: the first one wins
    leaving = False  # this process is exiting through Python
    notes: Path | None = None  # this node's notes for this job (see arm)
    rank = -1
    siblings: ClassVar[dict[int, int]] = {}  # rank -> pid of this node's other ranks, as watched


def arm(rank: int, job: str, host: str) -> None:
    """This process is ``rank`` of the job ``job`` (its store's endpoint
    and namespace) on ``host`` (the node's identity): make its inbox for
    its node's notes.  Called when its exchange is made; checks the
    setting."""
    enabled(_Config.fail_fast, os.environ)  # a bad environment variable says so now
    key = hashlib.sha256(f"{host}\0{job}".encode()).hexdigest()[:20]
    _State.notes = _base() / key
    _State.rank = rank
    _State.leaving = False
    try:
        for folder in (_base(), _State.notes, _State.notes / str(rank)):
            folder.mkdir(exist_ok=True, mode=0o700)
            if not _own(folder):
                raise PermissionError(f"{folder} is not a directory of this user's own")
    except OSError as exc:
        _log.debug("rank %d has no inbox for its node's notes: %r", rank, exc)


def _base() -> Path:
    return Path(tempfile.gettempdir()) / f"syncdeco-notes-{os.getuid()}"


def _own(path: Path) -> bool:
    """Whether ``path`` is a directory of this user's, not a link (a
    directory another user made in its place is not written to)."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _write_note(note: Mapping[str, Any]) -> None:
    """Leave ``note`` in the inbox of each rank of this node's job (each
    reads and removes its own copy; a rank gone takes its inbox with it)."""
    job = _State.notes
    if job is None or not _own(job):
        return
    name = f"{_State.rank}.{os.getpid()}.json"
    text = json.dumps(note)
    with contextlib.suppress(OSError):
        for inbox in job.iterdir():
            if inbox.name == str(_State.rank) or inbox.name.startswith(".") or not _own(inbox):
                continue  # (its own; one on its way out, see _discard; not the user's)
            with contextlib.suppress(OSError):
                tmp = inbox / f".{name}"
                tmp.write_text(text)
                os.replace(tmp, inbox / name)


def _read_note(rank: int, pid: int, *, keep: bool = False) -> dict[str, Any] | None:
    """The note ``rank`` (process ``pid``) of this node left this rank."""
    job = _State.notes
    if job is None:
        return None
    path = job / str(_State.rank) / f"{rank}.{pid}.json"
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not keep:
        with contextlib.suppress(OSError):
            path.unlink()
    return note if isinstance(note, dict) else None


def _leave_inbox() -> None:
    """Remove this rank's inbox (it reads no more), and those of the
    node's ranks whose process ended without removing theirs (killed), and
    the job's folder once no rank of the node has one."""
    job = _State.notes
    if job is None:
        return
    _discard(job / str(_State.rank))
    for rank, pid in sorted(_State.siblings.items()):
        if _proc.ended(pid):
            _discard(job / str(rank))
    with contextlib.suppress(OSError):
        job.rmdir()  # fails while another rank's inbox is there


def _discard(inbox: Path) -> None:
    """Remove ``inbox``, which other ranks may be writing a note into as
    they exit too: first out of their sight (renamed to a hidden name, so
    that a note on its way fails instead of landing in it), then, with a
    few tries, whatever landed meanwhile."""
    if not _own(inbox):
        return
    gone = inbox.with_name(f".{_LEFT}.{inbox.name}.{os.getpid()}")
    try:
        os.rename(inbox, gone)
    except OSError:
        return  # gone already
    for _ in range(_TRIES):
        _remove(gone)
        if not gone.exists():
            return
        time.sleep(0.01)


def note_exit(exc: BaseException | None, *, convert: bool = True) -> None:
    """At interpreter exit: say on this node how this process ends, so that
    its node's other ranks do not take its end for a loss.  An exit by an
    exception while a rank of this node has been lost (killed, or ended by
    fail-fast: a collective of this rank then often raises, as the lost
    rank's connections close) is that loss's: this rank ends as fail-fast
    ends it, naming the loss (``convert``; not for a ``SyncError``, which
    named it already)."""
    clean = exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0))
    if convert and not clean and not isinstance(exc, SyncError) and _wanted():
        losses = [
            loss
            for loss in (_sibling_loss(r, pid) for r, pid in sorted(_State.siblings.items()))
            if loss is not None and not loss.how.startswith("exited with")
        ]
        if losses:
            end(_merge(losses), _silent)
    with _State.lock:
        if _State.ended or _State.notes is None:
            return
        _State.leaving = True
    note: dict[str, Any] = {"how": "exit", "clean": clean}
    if not clean and exc is not None:
        note.update(exc_type=type(exc).__qualname__, message=str(exc))
    _write_note(note)
    _leave_inbox()
    _prune()


def _sibling_loss(rank: int, pid: int) -> Loss | None:
    """The loss that the end of ``rank`` of this node is, if it has ended."""
    note = _read_note(rank, pid, keep=True)
    if note is None and not _proc.ended(pid):
        return None
    return loss_from_note(rank, socket.gethostname(), note)


def watching(rank: int, pid: int) -> None:
    """The death watch watches ``rank``, process ``pid``, of this node."""
    _State.siblings[rank] = pid


def _prune() -> None:
    """Remove the notes of jobs that ended long ago (nobody reads them)."""
    base = _base()
    now = time.time()
    with contextlib.suppress(OSError):
        for job in base.iterdir():
            if job != _State.notes and now - job.lstat().st_mtime > _NOTE_AGE:
                _remove(job)


def _remove(job: Path | None) -> None:
    if job is None or not _own(job):
        return
    with contextlib.suppress(OSError):
        for entry in job.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                _remove(entry)
            else:
                entry.unlink()
        job.rmdir()


def peer_ended(rank: int, tell: Tell) -> None:
    """The death watch saw ``rank`` of this node end while
    this rank was outside a sync point: end this rank, unless it exited
    cleanly."""
    if not _wanted():
        return
    note = _read_note(rank, _State.siblings.get(rank, 0))
    loss = loss_from_note(rank, socket.gethostname(), note)
    if loss is not None:
        # A rank that left no note is reported here; one that failed fast
        # has told the store and the other nodes already.
        end([loss], tell, report=note is None, mark=loss.first is None)


def nodes_lost(failures: Sequence[Failure], tell: Tell) -> None:
    """The node watch saw ranks of other nodes lost (``failures``) while
    this rank was outside a sync point: end this rank."""
    if _wanted() and failures:
        end(_merge([loss_from_failure(f) for f in failures]), tell, report=True, mark=True)


def told_by_pulse(note: bytes, tell: Tell) -> None:
    """This node's pulse heard the job's loss mark, ``note`` (a rank's
    fail-fast note, see :func:`loss_from_mark`), while this rank, the node's
    main, was outside a sync point: end this rank (its node's other ranks
    end after it, through its note)."""
    loss = loss_from_mark(note)
    if loss is not None and _wanted():
        end([loss], tell, report=False, mark=False)


def not_said(failures: Sequence[Failure], store: Any, prefix: str) -> list[Failure]:
    """Of ``failures`` (a node watch's report), the losses: a node lost, or
    a rank of a node whose ranks all ended that did not say, in the job's
    store, that it exits cleanly (see ``exits.say_exit``)."""
    out: list[Failure] = []
    for failure in failures:
        if failure.lost_host or failure.lost_ranks:
            out.append(failure)
            continue
        key = exits.gone_key(prefix, failure.rank)
        try:
            said = load_failure(store.get(key)) if store.check([key]) else None
        except Exception as exc:
            _log.debug("fail-fast: could not read %s: %r", key, exc)
            said = None
        if said is None or said.killed or said.exc_type:
            out.append(said or failure)
    return out


def store_host_lost(host: str, ranks: tuple[int, ...]) -> None:
    """The job's store's host went silent while this rank was outside a
    sync point: end this rank (``ranks``: who ran there, as far as known)."""
    if _wanted():
        how = f"{_were(ranks)} lost with the host of the job's store (it went silent)"
        end([Loss(ranks, host, how)], _silent)


def _merge(losses: Sequence[Loss]) -> list[Loss]:
    """One loss per (host, how): ``ranks 2 and 3 on node1 ...``."""
    merged: dict[tuple[str, str, tuple[int, str] | None], set[int]] = {}
    for loss in losses:
        merged.setdefault((loss.host, loss.how, loss.first), set()).update(loss.ranks)
    return [Loss(tuple(sorted(r)), *key) for key, r in merged.items()]


def _wanted() -> bool:
    if _State.ended or _State.leaving or _State.notes is None:
        return False
    try:
        return enabled(_Config.fail_fast, os.environ)
    except ValueError:
        return False  # said at arm()


def end(
    losses: Sequence[Loss], tell: Tell = _silent, *, report: bool = False, mark: bool = False
) -> None:
    """End this process for ``losses`` (once; later calls return): leave
    the note, log the error, tell the job's store and the other nodes
    (``tell``, :data:`SPREAD` seconds at most), abort an NCCL group, and
    exit with :data:`EXIT_CODE`."""
    with _State.lock:
        if _State.ended or _State.leaving:
            return
        _State.ended = True
    first = losses[0]
    said = "; ".join(f"{_ranks(x.ranks)} {_how(x)}" if x is not first else x.how for x in losses)
    heard = first.first or (_State.rank, socket.gethostname())
    note = {"how": "fail-fast", "ranks": first.ranks, "host": first.host, "said": said}
    note["first"] = list(heard)
    _write_note(note)
    _leave_inbox()
    _log.error("%s", message(_State.rank, losses))
    text = json.dumps(note).encode()
    _bounded(lambda: tell(text, report=report, mark=mark), SPREAD)
    _bounded(_abort, _ABORT)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for handler in logging.getLogger().handlers + _log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_CODE)


def _bounded(work: Callable[[], None], seconds: float) -> None:
    def run() -> None:
        try:
            work()
        except Exception as exc:
            _log.debug("fail-fast: %r", exc)

    thread = threading.Thread(target=run, name="syncdeco-failfast", daemon=True)
    thread.start()
    thread.join(seconds)


def _abort() -> None:
    """Abort the default group where that ends a blocked collective: NCCL.
    (Gloo's abort does not wake a collective blocked on a peer in torch
    2.13: there, the process's end does.)"""
    dist: Any = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized() or "nccl" not in str(dist.get_backend()):
        return  # (a group of several backends is named "cpu:gloo,cuda:nccl")
    dist.distributed_c10d._abort_process_group()


def _forget_in_child() -> None:
    _State.lock = threading.Lock()
    _State.ended = _State.leaving = False
    _State.notes = None
    _State.siblings = {}


def note_at_exit() -> None:
    """At interpreter exit, before the exit notice (a step of syncdeco's one
    exit handler): this rank's note of how it ended."""
    note_exit(exits.uncaught())


os.register_at_fork(after_in_child=_forget_in_child)
