"""Where a rank is: its main thread's Python stack, asked for over the store.

When a sync point times out, the ranks that did not arrive are alive
somewhere else in their program.  Each rank runs a :class:`StackResponder`,
a daemon thread that sleeps in one blocking store wait on its own connection
until another rank asks; it then writes its process's main-thread stack to
the store.  :func:`fetch_stacks` asks several ranks at once and waits about a
second, in total, for their answers.

The protocol, per answering rank ``r`` (keys under ``{prefix}/{r}/``):

* ``asked``: a counter.  A request is ``n = add(asked, 1)``, so every request
  has its own number however many ranks ask at once, then ``set(bell)``.
* ``bell``: the key the responder waits for.  On waking it deletes the bell
  *before* reading ``asked``, so a request whose bell it deleted is counted,
  and one made after the read rings the bell again: none is lost.
* ``stack/{m}``: one answer, a pickled dict, for every request up to ``m``.
  The stack is read *after* ``m``, so it is never older than a request it
  answers.  ``reply/{n}`` holds ``m`` for each such request ``n``; a reply to
  an old request (one that came too late) sits under that old number and is
  never taken for a newer request's.
* ``served``: the last request answered (so a responder started later, or
  again, answers what is pending and no more); ``who``: host, pid, pid
  namespace, the job's world size and when the responder started, set as
  it starts, so a rank that does not answer can still be named and looked
  at with ``py-spy``, and so that ``python -m syncdeco where``, which is no
  rank, learns the job's size.

An answer also says which sync point the rank is in, for how long, or the
last one it left and how long ago (its exchange's ``at`` and ``passed``,
read without a lock: see :func:`sync_state`).

Every rank runs a responder.  Where a rank hosts the store (rank 0 under
SLURM or mpirun), the others' responders wait on a store that ends with
rank 0's process, and a store client blocked in a wait when its server goes
logs an error with a C++ stack, though a correct program's rank 0 often
ends first.  So the host, at its exit, ends them first
(:func:`end_responders`): it sets ``{prefix}/end``, then rings the bell of
each rank listed in ``{prefix}/started`` (each responder appends its rank
as it starts); a responder checks ``end`` as it starts and after deleting
its bell at each wake (so a ring is never lost), and then makes one last
store call, a set of its ``off`` key, which the host waits for (2 s at
most).

A responder deletes its bell at each wake and a round's keys at the first
wake at least 30 s later; what stays per rank is four small keys
(``asked``, ``served``, ``who``, ``off``) and the last round's replies.  A
rank that asks through one shared key instead (one bell for all) would wake
every responder of the job for one missing rank, and make the answers of
different ranks race for it: there is one bell per rank.

Steady state: a responder's wait has no timeout that fires (a wait that times
out makes torch's store client log two "waitForInput ... likely a timeout"
warnings, which a timed re-arm would print every few minutes on every rank):
it re-arms once a day, so its load on the store is one request per day, and
a sync point pays nothing.  Nor does the asking side time out a store wait:
it looks for the replies with ``check`` at growing intervals (about 25
requests in a second), so a rank that does not answer costs no warnings.

Exit: the responder thread is a daemon, and at interpreter exit
:func:`end_all` (a step of syncdeco's one exit handler, which ``import
syncdeco`` registers) rings its bell through a connection of its own, made
when the responder started, and waits (2 s at most) for it to end.  A
daemon thread still in a store call when the interpreter finalizes would
abort the process once that call returns (CPython ends it with
``pthread_exit`` from inside torch's C++ frames: "terminate called without
an active exception", status -6); a process that serves the store itself
(rank 0 under SLURM or mpirun) did so on every exit without the handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
import sys
import sysconfig
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib.util import find_spec
from pathlib import Path
from types import FrameType
from typing import Any, Final, final

from .. import _proc
from .._errors import NO_RESPONDER
from .deadline import look_until

__all__ = [
    "StackReport",
    "StackResponder",
    "SyncSeen",
    "end_responders",
    "fetch_stacks",
    "innermost_user_frame",
    "is_syncdeco_file",
    "last_answer",
    "main_thread_stack",
    "sync_state",
    "who",
    "who_key",
]

_log = logging.getLogger("syncdeco")

Frame = tuple[str, int, str]  # file, line, function
_Wire = tuple[str, int, str, str | None]  # file, line, function, source line

_FOREVER: Final = timedelta(days=1)  # one wait of the responder (no traffic while it lasts)
_KEEP: Final = 30.0  # seconds a round's reply stays for late readers before it is deleted
_BACKLOG: Final = 64  # the most pending requests one round answers
_FIRST_LOOK: Final = 0.001  # seconds before fetch_stacks first looks for replies
_MOST_BETWEEN_LOOKS: Final = 0.05
_LIMIT: Final = 50
_VERSION: Final = 1


# -- this process's main thread ---------------------------------------------------


def _main_frame() -> FrameType | None:
    return sys._current_frames().get(threading.main_thread().ident or -1)


def _extract(frame: FrameType | None, limit: int) -> tuple[list[_Wire], int]:
    """The innermost ``limit`` frames from ``frame`` outwards, outermost
    first, and how many frames the stack has in all."""
    frames: list[_Wire] = []
    depth = 0
    while frame is not None:
        if depth < limit:
            code = frame.f_code
            lineno = frame.f_lineno or code.co_firstlineno
            frames.append((code.co_filename, lineno, code.co_name, None))
        depth += 1
        frame = frame.f_back
    frames.reverse()
    return frames, depth


def _format(frames: Sequence[_Wire], depth: int) -> str:
    lines = ["Most recent call last:\n"]
    if depth > len(frames):
        lines.append(f"  ... {depth - len(frames)} outer frame(s) left out\n")
    for file, line, function, source in frames:
        lines.append(f'  File "{file}", line {line}, in {function}\n')
        if source:
            lines.append(f"    {source}\n")
    return "".join(lines)


def _with_source(frames: Iterable[_Wire]) -> list[_Wire]:
    import linecache

    return [(f, n, fn, linecache.getline(f, n).strip() or None) for f, n, fn, _ in frames]


def main_thread_stack(*, limit: int = _LIMIT) -> str:
    """This process's main thread's Python stack, as a traceback lists it
    (most recent call last), its innermost ``limit`` frames.  Safe to call
    from any thread; from the main thread it includes this call."""
    frames, depth = _extract(_main_frame(), limit)
    return _format(_with_source(frames), depth)


# -- whose code a frame is ----------------------------------------------------------

_OWN_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # syncdeco/
_FRAME_LINE: Final = re.compile(
    r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>.+?)\s*$'
)
_STDLIB_PATH: Final = re.compile(r"[/\\]lib[/\\](pypy|python)\d+(\.\d+)?t?[/\\]")


def _dirs() -> tuple[str, ...]:
    """Directories whose files are not the user's own: the standard library,
    site-packages, and torch (also where it is built from source)."""
    found: set[str] = set()
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            found.add(sysconfig.get_paths()[name])
    import site

    with contextlib.suppress(AttributeError):
        found.update(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        found.add(site.getusersitepackages())
    torch = sys.modules.get("torch")
    origin = getattr(torch, "__file__", None)
    if origin is None:
        with contextlib.suppress(ImportError, ValueError):
            spec = find_spec("torch")
            origin = spec.origin if spec is not None else None
    if origin:
        found.add(os.path.dirname(origin))
    return tuple(sorted(os.path.join(os.path.abspath(d), "") for d in found if d))


_NOT_USER_DIRS: Final = _dirs()


def is_syncdeco_file(file: str) -> bool:
    """Whether ``file`` (a code object's file name) is syncdeco's own."""
    if file.startswith("<"):
        return False
    folder = os.path.dirname(os.path.abspath(file))
    if folder == _OWN_DIR or folder.startswith(_OWN_DIR + os.sep):
        return True
    # Also on another host, where syncdeco lives elsewhere: its package folders.
    parent, name = os.path.split(folder)
    return name == "syncdeco" or (name == "_plane" and os.path.basename(parent) == "syncdeco")


def is_user_file(file: str) -> bool:
    """Whether ``file`` (a code object's file name) is the user's own code:
    not syncdeco's, torch's, the standard library's or an installed package's.
    Code run from ``python -c`` or ``exec`` (``<string>``, ``<stdin>``) is the
    user's; ``<frozen ...>`` modules are the standard library's."""
    if file.startswith("<"):
        return not file.startswith("<frozen ")
    if is_syncdeco_file(file):
        return False
    path = os.path.abspath(file)
    if any(path.startswith(d) for d in _NOT_USER_DIRS):
        return False
    parts = Path(path).parts
    return not ("site-packages" in parts or "dist-packages" in parts or _STDLIB_PATH.search(path))


def _as_frames(stack: str | Iterable[Any]) -> list[Frame]:
    if isinstance(stack, str):
        return [
            (m["file"], int(m["line"]), m["function"])
            for m in map(_FRAME_LINE.match, stack.splitlines())
            if m is not None
        ]
    frames: list[Frame] = []
    for frame in stack:
        if isinstance(frame, traceback.FrameSummary):
            frames.append((frame.filename, frame.lineno or 0, frame.name))
        else:
            frames.append((str(frame[0]), int(frame[1]), str(frame[2])))
    return frames


def innermost_user_frame(stack: str | Iterable[Any]) -> Frame | None:
    """(file, line, function) of the innermost frame of ``stack`` that is the
    user's own code (see :func:`is_user_file`), or None if there is none.

    ``stack`` lists frames outermost first, as a traceback does: either
    ``traceback.FrameSummary`` objects or tuples that start with (file, line,
    function), which pickle small and travel between processes; or the text
    of a formatted traceback (its ``File "...", line N, in f`` lines).  The
    answering rank classifies its own frames, where the paths are its own;
    on another host, site-packages, ``lib/pythonX.Y`` and a folder named
    ``syncdeco`` are still recognised by name."""
    for frame in reversed(_as_frames(stack)):
        if is_user_file(frame[0]):
            return frame
    return None


def _in_syncdeco(frames: Sequence[Frame], user: Frame | None) -> bool:
    """Whether syncdeco's code runs inside the innermost user frame."""
    inner = frames
    if user is not None:
        last = max(i for i, f in enumerate(frames) if f == user)
        inner = frames[last + 1 :]
    return any(is_syncdeco_file(f[0]) for f in inner)


# -- the answer -----------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class SyncSeen:
    """The sync point a rank is in (``inside``: for ``seconds``), or the last
    one it left (``seconds`` ago), as ``SyncPoint.describe()`` names it."""

    point: str
    seconds: float
    inside: bool


def sync_state(ref: Callable[[], Any]) -> SyncSeen | None:
    """Where the exchange that ``ref()`` returns (a weak reference) is in the
    sync protocol: its ``at`` (the sync point it is in, and since when, by
    ``time.monotonic``) or else its ``passed`` (the last it left, and when).
    Read from the responder's thread without the exchange's lock: each is
    one attribute, replaced whole."""
    made = ref()
    if made is None:
        return None
    now = time.monotonic()
    at = getattr(made, "at", None)
    if at is not None:
        return SyncSeen(at[0].describe(), max(0.0, now - at[1]), True)
    passed = getattr(made, "passed", None)
    if passed is not None:
        return SyncSeen(passed[0].describe(), max(0.0, now - passed[1]), False)
    return None


@final
@dataclass(frozen=True, slots=True)
class StackReport:
    """Where one rank's main thread is, or why it could not say.

    ``stack`` is its main thread's stack, formatted like a traceback (most
    recent call last), and None when the rank did not answer; ``reason`` then
    says so and why it may not have ("did not answer within 1 s: its process
    is stopped ...").  ``frame`` is the innermost frame of the user's
    own code, (file, line, function); ``in_syncdeco`` whether syncdeco's code
    runs inside that frame (the rank is at a sync point of its own, and
    ``frame`` is where the program called it).  ``host`` and ``pid`` name
    its process when known; ``age`` is how many seconds before the reply was
    read the stack was taken, by the answering host's clock against this one's.
    ``sync``: the sync point it is in, or the last it left (None: none yet,
    or it did not answer); ``ended``: its responder has stopped for good
    (its process exited).
    """

    rank: int
    stack: str | None = None
    frame: Frame | None = None
    in_syncdeco: bool = False
    host: str | None = None
    pid: int | None = None
    reason: str | None = None
    age: float | None = None
    sync: SyncSeen | None = None
    ended: bool = False

    @property
    def answered(self) -> bool:
        return self.stack is not None

    def where(self) -> str:
        """Where the rank is, in a few words, for one line of a message."""
        if self.stack is None:
            return str(self.reason)
        if self.frame is None:
            place = "outside the user's code (its stack shows where)"
        else:
            file, line, function = self.frame
            place = f"in {function} ({file}:{line})"
        if self.in_syncdeco:
            return (
                f"is at a syncdeco sync point of its own, called {place}"
                if self.frame
                else "is at a syncdeco sync point of its own"
            )
        return f"is {place}"

    def describe(self) -> str:
        """A line for the rank, then its stack indented, if it answered."""
        head = f"rank {self.rank} {self.where()}"
        if self.stack is None:
            return head
        return head + "\n" + "".join(f"  {line}\n" for line in self.stack.splitlines())


def _answer(limit: int, sync: Callable[[], SyncSeen | None] | None = None) -> dict[str, object]:
    frames, depth = _extract(_main_frame(), limit)
    seen = sync() if sync is not None else None
    frames = _with_source(frames)
    plain = [f[:3] for f in frames]
    user = innermost_user_frame(plain)
    return {
        "sync": None if seen is None else (seen.point, seen.seconds, seen.inside),
        "version": _VERSION,
        "stack": _format(frames, depth),
        "frame": user,
        "in_syncdeco": _in_syncdeco(plain, user),
        "taken": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


# -- the store keys ----------------------------------------------------------------


@final
class _Keys:
    __slots__ = ("asked", "base", "bell", "end", "off", "rank", "served", "started", "who")

    def __init__(self, prefix: str, rank: int) -> None:
        self.rank = rank
        self.base = f"{prefix}/{rank}"
        self.asked = f"{self.base}/asked"
        self.bell = f"{self.base}/bell"
        self.served = f"{self.base}/served"
        self.who = f"{self.base}/who"
        self.off = f"{self.base}/off"  # set as its responder's last store call
        self.started = f"{prefix}/started"  # "r," appended by each responder that starts
        self.end = f"{prefix}/end"  # set by the store's host before its store ends

    def reply(self, n: int) -> str:
        return f"{self.base}/reply/{n}"

    def stack(self, m: int) -> str:
        return f"{self.base}/stack/{m}"


def _whoami(world_size: int | None) -> bytes:
    started = time.time()
    return pickle.dumps((socket.gethostname(), os.getpid(), _pid_namespace(), world_size, started))


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


# -- answering -----------------------------------------------------------------------

_EXIT_WAIT: Final = 2.0  # seconds interpreter exit waits for a responder thread to end


@final
class StackResponder:
    """Answers other ranks' requests for this process's main-thread stack.

    ``store`` must be a connection of the responder's own (``store.clone()``):
    its thread holds it in a blocking wait.  ``start()`` starts that thread
    (a daemon, so it never keeps the process alive); ``close()`` asks it to
    stop.  The thread needs the GIL for a moment to read the stack, so a
    process whose main thread holds the GIL (a long C call) answers only when
    it lets go of it.

    At interpreter exit (an ``atexit`` handler) the thread is woken and ended
    before the interpreter finalizes: a daemon thread that returns from a
    store call while the interpreter finalizes is ended by CPython with
    ``pthread_exit``, which aborts the process from torch's C++ frames
    ("terminate called without an active exception", status -6).
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_keys",
        "_limit",
        "_ready",
        "_ring",
        "_store",
        "_sync",
        "_thread",
        "_world_size",
    )

    def __init__(
        self,
        store: Any,
        prefix: str,
        rank: int,
        *,
        limit: int = _LIMIT,
        ring: Any = None,
        world_size: int | None = None,
        sync: Callable[[], SyncSeen | None] | None = None,
    ) -> None:
        """``world_size``: the job's, said in ``who`` for tools that are no
        rank; ``sync``: where this rank is in the sync protocol, for the
        answers (see :func:`sync_state`)."""
        self._store = store
        # Another connection to the same store, made beforehand, that rings
        # the bell at exit (None: one is made then).  Connecting at exit to a
        # store host that stalls for a moment makes c10d log an error (seen
        # in soak runs on a loaded machine); a set on an open connection
        # does not wait for the host.
        self._ring = ring
        self._keys = _Keys(prefix, rank)
        self._limit = limit
        self._world_size = world_size
        self._sync = sync
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start answering (once; a second call does nothing)."""
        if self._thread is not None or self._closed.is_set():
            return
        self._thread = threading.Thread(
            target=_respond,
            args=(
                self._store,
                self._keys,
                (self._limit, self._world_size, self._sync),
                self._closed,
                self._ready,
            ),
            name="syncdeco-stacks",
            daemon=True,
        )
        _at_exit(self)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, *, ring: Any = None) -> None:
        """Stop answering.  Idempotent and never blocks on its thread, which
        is held in a store wait: it ends at its next wake, at interpreter
        exit, or with the process.  ``ring``, another connection to the same
        store, wakes it now and tells askers it no longer answers (two store
        requests)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if ring is not None:
            with contextlib.suppress(Exception):
                ring.delete_key(self._keys.who)  # askers now hear it has no responder
                if self.running:
                    ring.set(self._keys.bell, b"close")

    def _ring_at_exit(self, deadline: float, rings: dict[object, Any]) -> threading.Thread | None:
        """Wake the thread through another connection (in the exiting
        thread: a helper thread still connecting when the interpreter
        finalizes would abort it too); the thread to wait for, if any.
        ``rings`` keeps the ring connections made so far, by server, for
        responders that share one (several in one process, in a simulation)."""
        self._closed.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            return None  # never started, or its store is gone
        try:
            server = _server_of(self._store)
            ring = self._ring
            if ring is None and server is not None:
                ring = rings.get(server)
            if ring is None:
                # The ring connection inherits this timeout: a store host that
                # cannot be reached holds the exit up until the deadline only.
                left = max(deadline - time.monotonic(), 0.05)
                self._store.set_timeout(timedelta(seconds=left))
                ring = self._store.clone()
                if server is not None:
                    rings[server] = ring
            ring.set(self._keys.bell, b"exit")
        except Exception:
            return None
        return thread


def _server_of(store: Any) -> tuple[str, int] | None:
    """The address of a plain TCPStore (a PrefixStore's keys depend on a
    prefix it does not show: None)."""
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if type(store).__name__ != "TCPStore" or host is None or port is None:
        return None
    return str(host), int(port)


_responders: weakref.WeakSet[StackResponder] = weakref.WeakSet()


def _at_exit(responder: StackResponder) -> None:
    _responders.add(responder)


def end_all() -> None:
    """At interpreter exit: wake every responder thread and wait (2 s in all)
    for them to end, so none is in a store call when the interpreter
    finalizes.  Past the deadline the rest stay asleep, unrung, in their waits."""
    deadline = time.monotonic() + _EXIT_WAIT
    rings: dict[object, Any] = {}
    woken = [
        responder._ring_at_exit(deadline, rings)
        for responder in list(_responders)
        if time.monotonic() < deadline
    ]
    for thread in woken:
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))


def end_responders(
    store: Any, prefix: str, *, skip: Iterable[int] = (), timeout: float = _EXIT_WAIT
) -> list[int]:
    """On the process that hosts the store the responders wait on (rank 0
    under SLURM, Open MPI, or RANK/WORLD_SIZE set by hand), before its store
    ends with it: stop every other responder on it, and wait (``timeout``
    seconds at most, in all) until each has made its last store call.

    A store client blocked in a wait when its server goes logs an error with
    a C++ stack, and a correct program's rank 0 often ends first: so the
    host ends the responders while its store is still up.  It sets ``end``,
    then rings the bell of each responder that said it started; a responder
    sees ``end`` at its next wake (or as it starts), makes one last set
    (``off``) and stops.  ``skip``: ranks not to wait for (this process's
    own, ranks known to have exited).  Returns the ranks that did not stop
    in time (killed, or holding the GIL): they may log when the store goes.
    """
    store.set(f"{prefix}/end", b"1")
    skipped = set(skip)
    started: set[int] = set()
    if store.check([f"{prefix}/started"]):
        text = bytes(store.get(f"{prefix}/started")).decode()
        started = {int(r) for r in text.split(",") if r}
    pending = [_Keys(prefix, r) for r in sorted(started - skipped)]
    if not pending:
        return []
    store.multi_set([k.bell for k in pending], [b"end"] * len(pending))
    offs = [k.off for k in pending]
    if look_until(lambda: store.check(offs), timeout, first=_FIRST_LOOK, most=_MOST_BETWEEN_LOOKS):
        return []
    return [k.rank for k in pending if not store.check([k.off])]


_Options = tuple[int, int | None, Callable[[], SyncSeen | None] | None]  # limit, size, sync


def _respond(
    store: Any, keys: _Keys, options: _Options, closed: threading.Event, ready: threading.Event
) -> None:
    rounds: list[tuple[float, list[str]]] = []  # when written, and the keys
    try:
        served = int(store.get(keys.served)) if store.check([keys.served]) else 0
        store.delete_key(keys.off)  # a responder of this rank before this one said it
        store.set(keys.who, _whoami(options[1]))
        store.append(keys.started, f"{keys.rank},")  # after `end` is set: then seen below
        ready.set()
        ended = store.check([keys.end])
        while not (ended or closed.is_set()):
            try:
                store.wait([keys.bell], _FOREVER)
            except Exception as exc:
                if "timeout" in str(exc).lower():
                    continue  # a day without a request
                raise
            if closed.is_set():
                break  # one store call more, then none: the interpreter may be exiting
            store.delete_key(keys.bell)  # before reading the counter: no request is lost
            # After the bell is deleted: the host rings it after setting `end`.
            ended = store.check([keys.end])
            if ended:
                break
            asked = int(store.add(keys.asked, 0))
            if asked > served:
                served = _serve(store, keys, options, served, asked, rounds)
            now = time.monotonic()
            while rounds and now - rounds[0][0] >= _KEEP:
                for key in rounds.pop(0)[1]:
                    store.delete_key(key)
    except Exception as exc:  # the store is gone (its host exited): stop quietly
        _log.debug("syncdeco's stack responder stopped: %r", exc)
        return
    # Its last store call, a set (no reply to wait for): the store's host,
    # ending, waits for it before its store ends (see end_responders).
    with contextlib.suppress(Exception):
        store.set(keys.off, b"")


def _serve(
    store: Any,
    keys: _Keys,
    options: _Options,
    served: int,
    asked: int,
    rounds: list[tuple[float, list[str]]],
) -> int:
    try:
        answer: dict[str, object] = _answer(options[0], options[2])
    except Exception as exc:  # report it rather than let the asker wait
        answer = {
            "version": _VERSION,
            "error": f"could not read its stack: {exc!r}",
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
    first = max(served + 1, asked - _BACKLOG + 1)
    replies = [keys.reply(n) for n in range(first, asked + 1)]
    store.set(keys.stack(asked), pickle.dumps(answer))
    store.multi_set(replies, [str(asked)] * len(replies))
    store.set(keys.served, str(asked))
    rounds.append((time.monotonic(), [keys.stack(asked), *replies]))
    return asked


# -- asking ---------------------------------------------------------------------------


def fetch_stacks(
    store: Any, prefix: str, ranks: Sequence[int], *, timeout: float = 1.0
) -> dict[int, StackReport]:
    """Ask each of ``ranks`` for its main thread's stack, and wait up to
    ``timeout`` seconds in all (not per rank) for their answers.

    Each rank is asked through a key of its own, so only the ranks asked
    wake up.  A rank that does not answer in time gets a report with
    ``reason`` saying what may keep it; its answer, if it comes later, is
    never taken for a later request's.  Costs nothing until called: call it
    when a sync point has already timed out, or from a tool.  ``store`` is
    any connection to the store the responders use; its timeout is not
    changed, and no store wait is left to time out (which would make torch
    log warnings).

    Store requests: an ``add`` per rank, one ``multi_set`` that rings every
    bell, about 25 ``check`` requests a second while waiting, then two
    ``multi_get`` requests for the answers; a rank that did not answer costs
    three more (a ``check`` of its reply, and of its ``who`` and ``off``).
    """
    asked: dict[int, tuple[_Keys, int]] = {}
    for rank in dict.fromkeys(ranks):
        keys = _Keys(prefix, rank)
        asked[rank] = keys, int(store.add(keys.asked, 1))
    if not asked:
        return {}
    store.multi_set([keys.bell for keys, _ in asked.values()], [b""] * len(asked))
    replies = {rank: keys.reply(n) for rank, (keys, n) in asked.items()}
    everyone = look_until(
        lambda: store.check(list(replies.values())),
        timeout,
        first=_FIRST_LOOK,
        most=_MOST_BETWEEN_LOOKS,
    )
    answered = [r for r in asked if everyone or store.check([replies[r]])]
    reports: dict[int, StackReport] = {}
    if answered:
        served = [int(m) for m in store.multi_get([replies[r] for r in answered])]
        stack_keys = [asked[r][0].stack(m) for r, m in zip(answered, served, strict=True)]
        for rank, data in zip(answered, store.multi_get(stack_keys), strict=True):
            reports[rank] = _report(rank, pickle.loads(data))
    for rank, (keys, _) in asked.items():
        if rank not in reports:
            reports[rank] = _silent_report(store, rank, keys, timeout)
    return {rank: reports[rank] for rank in asked}


def _report(rank: int, answer: dict[str, Any]) -> StackReport:
    host, pid = answer.get("host"), answer.get("pid")
    if "error" in answer:
        return StackReport(rank, host=host, pid=pid, reason=f"answered, but {answer['error']}")
    frame, sync = answer["frame"], answer.get("sync")
    return StackReport(
        rank,
        stack=str(answer["stack"]),
        frame=(str(frame[0]), int(frame[1]), str(frame[2])) if frame else None,
        in_syncdeco=bool(answer["in_syncdeco"]),
        host=host,
        pid=pid,
        age=max(0.0, time.time() - float(answer["taken"])),
        sync=None if sync is None else SyncSeen(str(sync[0]), float(sync[1]), bool(sync[2])),
    )


def _silent_report(store: Any, rank: int, keys: _Keys, timeout: float) -> StackReport:
    who = _who(store, keys)
    if who is None:
        return StackReport(
            rank,
            reason=(
                f"{NO_RESPONDER} (it has not reached its first sync point yet, or it has exited)"
            ),
        )
    host, pid, namespace = who[:3]
    if store.check([keys.off]):  # its responder's last store call
        return StackReport(
            rank,
            host=host,
            pid=pid,
            reason="did not answer: its process has exited (its stack responder has stopped)",
            ended=True,
        )
    return StackReport(rank, host=host, pid=pid, reason=_why_silent(timeout, host, pid, namespace))


def who(store: Any, prefix: str, ranks: Sequence[int]) -> dict[int, tuple[Any, ...]]:
    """What the responders of ``ranks`` said of themselves as they started
    (host, pid, pid namespace, and, from this version on, the job's world
    size and when it started), in one ``multi_get``: each of ``ranks`` must
    have said it (its ``who`` key is there: see :func:`who_key`)."""
    if not ranks:
        return {}
    found = store.multi_get([_Keys(prefix, r).who for r in ranks])
    return {r: tuple(pickle.loads(v)) for r, v in zip(ranks, found, strict=True)}


def last_answer(store: Any, prefix: str, rank: int) -> StackReport | None:
    """The last answer ``rank`` gave, while it is still kept (30 s after,
    until its responder's next wake), or None: for a rank that does not
    answer now, where it was last seen."""
    keys = _Keys(prefix, rank)
    if not store.check([keys.served]):
        return None
    key = keys.stack(int(store.get(keys.served)))
    if not store.check([key]):
        return None
    return _report(rank, pickle.loads(store.get(key)))


def who_key(prefix: str, rank: int) -> str:
    """The key where ``rank``'s responder says who it is, under ``prefix``."""
    return _Keys(prefix, rank).who


def _who(store: Any, keys: _Keys) -> tuple[str, int, str | None] | None:
    if not store.check([keys.who]):
        return None
    host, pid, namespace = pickle.loads(store.get(keys.who))[:3]
    return str(host), int(pid), namespace


def _why_silent(timeout: float, host: str, pid: int, namespace: str | None) -> str:
    """Why a rank with a responder did not answer: from its process's state
    when it runs on this host (in this pid namespace), else the usual
    suspects; and how to look at it."""
    head = f"did not answer within {timeout:g} s"
    look = f"To see where it is: py-spy dump --pid {pid} (on host {host})."
    state = None
    if host == socket.gethostname() and namespace is not None and namespace == _pid_namespace():
        state = _process_state(pid)
    if state is not None:
        return f"{head}: {state}. {look}"
    return (
        f"{head}: its main thread may be in a long C call that holds the GIL "
        f"(pickling or copying a large object, an extension that does not release "
        f"it), or its process may be stopped (SIGSTOP, Ctrl-Z, a debugger), swapping, "
        f"or gone. {look}"
    )


_STATES: Final = {
    "T": "its process is stopped (SIGSTOP or Ctrl-Z; SIGCONT resumes it)",
    "t": "its process is stopped by a debugger (tracing stop)",
    "D": "its main thread is in uninterruptible sleep (disk or network filesystem "
    "I/O, or swapping)",
    "Z": "its process has ended (a zombie not yet reaped by its launcher)",
    "X": "its process has ended",
}


def _process_state(pid: int) -> str | None:
    """What /proc says of ``pid`` on this host, if it explains the silence."""
    try:
        state = _proc.state(pid)
    except OSError:
        return None
    if state is None:
        return "its process has ended"
    swapped = _swapped_mib(pid)
    if state in _STATES:
        said = _STATES[state]
    elif state in ("R", "S"):
        said = (
            "its process is alive (running)" if state == "R" else "its process is alive (sleeping)"
        )
        said += ", so its main thread most likely holds the GIL in a long C call"
    else:
        return None
    if swapped:
        said += f"; {swapped} MiB of it is swapped out"
    return said


def _swapped_mib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmSwap:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
