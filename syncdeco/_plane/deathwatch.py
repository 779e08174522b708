"""Learn through the kernel that a process on this host has ended.

A rank killed by a signal (SIGKILL, the out-of-memory killer, a segfault) or
ended by ``os._exit()`` runs no exit handler, so it cannot say that it is
leaving.  The kernel knows at once: ``os.pidfd_open(pid)`` (Linux 5.3+) gives
a file descriptor that becomes readable when that process ends.  Every rank
watches the other ranks of its host with one daemon thread blocked in
``poll()`` on their pidfds and on a wake-up pipe:

* nothing runs while nothing dies: no periodic wake-up, no store traffic, and
  nothing on the sync path;
* only an ended process makes its pidfd readable, so a process that holds its
  GIL in a long C call, or that is stopped (SIGSTOP), is never reported; the
  watching thread waits in ``poll()`` without the GIL, so a busy main thread
  here does not delay it either (beyond getting the GIL back for the report).

A pid only names a process inside one PID namespace of one running kernel:
:func:`identity` describes this process so that :func:`watchable` can tell,
from the identities of a node's ranks, which of them this process can watch.
Where pidfds are unavailable (not Linux, an old kernel, a sandbox that refuses
the call), :meth:`DeathWatch.watch` says so and raises nothing.

A report says that the process ended, not how: a clean exit is reported too
(the caller knows which ranks announced theirs).  ``on_death`` runs on the
watch thread, so it needs the GIL: a main thread here that holds the GIL in
a long C call delays the report until it lets go.

Limits: a rank alone on its host (or in a pid namespace of its own) has no
sibling to watch it; a pid reused between the exchange of identities and
:meth:`DeathWatch.watch` (``pid_max`` process starts in that window) would be
watched in place of the ended rank, which then goes unreported (never a false
report).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Final, final

_log = logging.getLogger("syncdeco")

_BOOT_ID: Final = "/proc/sys/kernel/random/boot_id"
_PID_NS: Final = "/proc/self/ns/pid"

Identity = tuple[str, int, int]
"""``(host, pid namespace, pid)`` of one process; see :func:`identity`."""


def identity() -> Identity:
    """``(host, pid namespace, pid)`` of this process.

    ``host`` is the host name joined to the running kernel's boot id
    (``"node7/80109975-..."``): host names are not unique in every cluster, and
    the pid namespace number of a host's initial namespace is the same on every
    Linux host, so a name alone could make a rank watch (or declare dead) a pid
    on another machine.  Where the boot id or the namespace cannot be read
    (not Linux), the host is the bare name and the namespace is 0, which
    :func:`watchable` never matches."""
    host = socket.gethostname()
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
        pid_ns = os.stat(_PID_NS).st_ino
    except OSError:
        return host, 0, os.getpid()
    return f"{host}/{boot}", pid_ns, os.getpid()


def watchable(mine: Identity, others: Mapping[int, Identity]) -> dict[int, int]:
    """rank -> pid of the processes in ``others`` this process can watch.

    Those are the ones on the same running kernel and in the same pid
    namespace, this process itself excepted; an unknown namespace (0) matches
    nothing."""
    host, pid_ns, pid = mine
    if not pid_ns:
        return {}
    return {
        rank: other[2]
        for rank, other in others.items()
        if other[0] == host and other[1] == pid_ns and other[2] != pid
    }


def _open(pid: int) -> int:
    """A pidfd for ``pid``; raises OSError (ESRCH: already gone)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        raise OSError(errno.ENOSYS, "os.pidfd_open is not available on this platform")
    fd: int = pidfd_open(pid)
    return fd


# Live watches, so that a forked child drops the ones it inherited.
_watches: weakref.WeakSet[DeathWatch] = weakref.WeakSet()


@final
class DeathWatch:
    """Calls ``on_death(rank)`` when a watched process ends, however it ends.

    One daemon thread, started by the first :meth:`watch`, blocks in
    ``poll()`` on the watched processes' pidfds.  ``on_death`` runs on that
    thread, at most once per rank for the life of the watch; an exception in
    it is logged at debug level and dropped.  A forked child does not inherit
    the watch: there it is closed.  Thread-safe."""

    __slots__ = (
        "__weakref__",
        "_added",
        "_closed",
        "_dead",
        "_lock",
        "_name",
        "_on_death",
        "_pipe",
        "_polled",
        "_removed",
        "_reported",
        "_thread",
        "_unwatched",
        "_watched",
    )

    def __init__(self, on_death: Callable[[int], None], *, name: str = "syncdeco-deathwatch"):
        self._on_death = on_death
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None  # (read, write) wake-up pipe
        self._closed = False
        # Under the lock: what watch() asks of the thread.
        self._added: dict[int, int] = {}  # rank -> pidfd
        self._removed: set[int] = set()
        self._dead: list[int] = []  # ranks found gone at watch()
        # rank -> pid of every rank watched and not yet reported.
        self._watched: dict[int, int] = {}
        self._reported: set[int] = set()
        self._unwatched: set[int] = set()
        self._polled: dict[int, tuple[int, int]] = {}  # pidfd -> (rank, pid), the thread's
        _watches.add(self)

    @property
    def unwatched(self) -> frozenset[int]:
        """The ranks :meth:`watch` could not watch (no pidfds here)."""
        with self._lock:
            return frozenset(self._unwatched)

    def watch(self, rank: int, pid: int) -> bool:
        """Watch process ``pid`` as ``rank``.

        True when it is watched, or was already gone (then ``on_death(rank)``
        comes soon from the watch thread).  False when it cannot be watched
        (no pidfds on this platform or kernel, refused, out of descriptors, or
        this watch is closed); the rank is then listed in :attr:`unwatched`.
        Watching a rank again with the same pid does nothing; with another pid
        it watches the new one instead.  A rank already reported stays
        reported: watching it again does nothing."""
        with self._lock:
            if self._closed:
                return False
            if rank in self._reported or self._watched.get(rank) == pid:
                return True
        try:
            fd: int | None = _open(pid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                _log.debug("syncdeco: cannot watch rank %d (pid %d) for its end: %s", rank, pid, e)
                with self._lock:
                    self._unwatched.add(rank)
                return False
            fd = None  # already gone
        with self._lock:
            if self._closed:
                if fd is not None:
                    os.close(fd)
                return False
            self._unwatched.discard(rank)
            self._watched[rank] = pid
            old = self._added.pop(rank, None)
            if old is not None:
                os.close(old)
            self._removed.add(rank)  # the thread drops an older pidfd of this rank first
            if fd is None:
                self._dead.append(rank)
            else:
                self._added[rank] = fd
            self._start()
            self._wake()
        return True

    def close(self) -> None:
        """Stop the thread and close every descriptor; idempotent, never raises.

        Safe at interpreter exit and from ``on_death`` itself; waits at most a
        second for an ``on_death`` call in progress (the thread ends after it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._wake()
            if thread is None:  # no thread ever ran: nothing else owns the fds
                self._release()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    # -- internals ---------------------------------------------------------

    def _start(self) -> None:
        # Under the lock.
        if self._thread is not None:
            return
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[0], False)
        os.set_blocking(self._pipe[1], False)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        # Under the lock.
        if self._pipe is None:
            return
        try:
            os.write(self._pipe[1], b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the thread will look

    def _release(self) -> None:
        # Under the lock, once no thread uses the fds.
        for fd in (*self._added.values(), *self._polled):
            _close(fd)
        self._added.clear()
        self._polled.clear()
        if self._pipe is not None:
            _close(self._pipe[0])
            _close(self._pipe[1])
            self._pipe = None

    def _run(self) -> None:
        poller = select.poll()
        polled = self._polled  # pidfd -> (rank, pid); only this thread changes it
        assert self._pipe is not None
        wake = self._pipe[0]
        poller.register(wake, select.POLLIN)
        try:
            while True:
                dead: list[int] = []
                lost: list[int] = []
                for fd, event in poller.poll():  # blocks, without the GIL, until something happens
                    if fd == wake:
                        continue
                    rank, pid = polled.pop(fd)
                    poller.unregister(fd)
                    if event & select.POLLNVAL or not _ended(fd, pid):
                        lost.append(rank)  # not our pidfd any more: closed behind our back
                    else:
                        os.close(fd)
                        dead.append(rank)
                with self._lock:
                    try:
                        while os.read(wake, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    if self._closed:
                        return
                    lost = [r for r in lost if r not in self._removed]
                    for rank in lost:
                        _log.debug(
                            "syncdeco: rank %d's pidfd was closed elsewhere; unwatched", rank
                        )
                        if self._watched.pop(rank, None) is not None:
                            self._unwatched.add(rank)
                    # older pidfds of ranks watched anew are dropped, and
                    # so are their deaths seen in this round.
                    for fd, (rank, _) in list(polled.items()):
                        if rank in self._removed:
                            del polled[fd]
                            poller.unregister(fd)
                            os.close(fd)
                    dead = [r for r in dead if r not in self._removed]
                    self._removed.clear()
                    for rank, fd in self._added.items():
                        polled[fd] = (rank, self._watched[rank])
                        poller.register(fd, select.POLLIN)
                    self._added.clear()
                    dead += self._dead
                    self._dead.clear()
                    dead = [r for r in dead if r not in self._reported]
                    for rank in dead:
                        self._reported.add(rank)
                        self._watched.pop(rank, None)
                for rank in dead:
                    self._report(rank)
        except BaseException:  # a bug here must not end the job; say so at debug level
            _log.debug("syncdeco: the death watch stopped", exc_info=True)
        finally:
            with self._lock:
                self._closed = True
                self._release()

    def _report(self, rank: int) -> None:
        try:
            self._on_death(rank)
        except Exception:
            _log.debug("syncdeco: on_death(%d) raised; ignored", rank, exc_info=True)

    def _forget_in_child(self) -> None:
        # In a forked child: no watch thread exists here, and the lock may have
        # been held by it at the fork.  Close what was inherited.
        self._lock = threading.Lock()
        self._closed = True
        self._thread = None
        self._watched.clear()
        self._release()


def _ended(fd: int, pid: int) -> bool:
    """Whether ``fd``, readable, is still the pidfd of ``pid`` (so: it ended).

    The kernel writes ``Pid: <pid>`` in a pidfd's fdinfo, ``Pid: -1`` once the
    process is reaped.  Anything else means the descriptor was closed behind
    this module's back and its number reused; that is no death."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = f.read()
    except OSError:
        return True  # no /proc to ask: trust the kernel's event
    for line in info.splitlines():
        if line.startswith("Pid:"):
            return line.split()[1] in (str(pid), "-1")
    return False


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _forget_in_child() -> None:
    for watch in list(_watches):
        watch._forget_in_child()


os.register_at_fork(after_in_child=_forget_in_child)
