"""A connection to the job's store that notices when the store's host is lost.

A store call waits on a TCP connection.  When the store's host is lost
without a word (power, a kernel panic, a cut link: no FIN, no RST), nothing
tells the connection: a ``get`` that waits for a key waits forever, and one
that times out sends the store a request to stop waiting and then waits
forever for its answer.  The kernel can tell, with no help from the process
(so a rank holding the GIL is no matter): this module turns on, for every
connection of this process to the job's store,

* TCP keepalive: after :data:`IDLE` seconds of silence, a probe every
  :data:`INTERVAL` seconds, and the connection is dropped after
  :data:`PROBES` unanswered ones (about 7 s after the host went);
* ``TCP_USER_TIMEOUT``: a request whose bytes stay unacknowledged for
  :data:`UNACKED` seconds drops the connection too (keepalive does not
  probe while data waits for an acknowledgement);
* linear retransmission timeouts for these thin streams, where the kernel
  has them, so a request sent while a link drops packets for a few seconds
  goes through soon after it heals instead of up to 6 s later.

The store call then raises ``DistNetworkError`` ("Connection timed out"),
which the exchange turns into an error naming the store's host.

A request sent after the host was lost is unacknowledged data, which the
kernel gives up on only :data:`UNACKED` seconds after it was sent (a sync
point whose timeout expires sends one: torch's client tells the store to
stop waiting).  So that no store call outlives the loss by that much, a
:class:`StoreWatch` keeps one idle connection of its own (a canary: idle,
so keepalive probes it) and a thread blocked in ``poll()`` on it, which
needs no GIL; when the kernel drops the canary for silence, the thread
shuts down every connection of this process to the store, and every store
call blocked on one fails at once.  A link
that drops every packet for 3 s does not drop the connection: 3 s of lost
probes are at most 4 of the 5, and 3 s is under :data:`UNACKED`.

The connections are found by their peer, the store's address and port, in
``/proc/self/fd`` (a c10d store does not expose its socket), and tuned
through a duplicate of each descriptor: options belong to the socket, so
the duplicate's are the original's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["StoreWatch", "endpoint", "keep_alive", "silent", "underlying", "went_silent"]

IDLE: Final = 2  # seconds of silence before the first probe
INTERVAL: Final = 1  # seconds between probes
PROBES: Final = 5  # unanswered probes that drop the connection
UNACKED: Final = 7  # seconds a request may go unacknowledged
_log = logging.getLogger("syncdeco")
_silenced: set[tuple[str, int]] = set()  # stores whose host a StoreWatch found silent
_THIN_LINEAR_TIMEOUTS: Final = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)  # Linux


def underlying(store: Any) -> Any:
    """The store under ``store``'s prefix stores."""
    for _ in range(8):
        below = getattr(store, "underlying_store", None)
        if below is None:
            break
        store = below
    return store


def endpoint(store: Any) -> tuple[str, int] | None:
    """The (host, port) of the TCP store under ``store`` (prefix stores
    unwrapped), or None for another kind of store."""
    store = underlying(store)
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if isinstance(host, str) and isinstance(port, int) and port > 0:
        return host, port
    return None


def _addresses(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


def keep_alive(host: str, port: int) -> int:
    """Tune every TCP connection of this process to ``host:port`` (see the
    module's docstring); returns how many were found.  Connections made
    later need another call.  Best effort: where ``/proc`` or an option is
    missing, what can be set is."""
    tuned = 0
    for sock in _connections(host, port):
        with sock:
            _tune(sock)
            tuned += 1
    return tuned


def _connections(host: str, port: int) -> list[socket.socket]:
    """Duplicates of this process's TCP connections to ``host:port`` (the
    caller closes them)."""
    peers = _addresses(host)
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found: list[socket.socket] = []
    for name in fds:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if dup.type != socket.SOCK_STREAM or dup.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                raise OSError
            peer = dup.getpeername()  # raises where it is not connected
            if peer[1] != port or not {peer[0], _unmapped(peer[0])} & peers:
                raise OSError
        except OSError:
            dup.close()
            continue
        found.append(dup)
    return found


class StoreWatch:
    """Notices the loss of the store's host and fails every store call of
    this process that waits on it (see the module's docstring).  ``clone``
    is a store connected to it, whose ``clone()`` makes the canary."""

    __slots__ = ("_canary", "_sock", "host", "lost_at", "on_lost", "port", "thread")

    def __init__(self, host: str, port: int, clone: Any) -> None:
        self.host, self.port = host, port
        self.lost_at: float | None = None  # time.monotonic() when it was found lost
        self.on_lost: Callable[[str], None] | None = None  # called with the host, in the thread
        before = _socket_inodes()
        self._canary = clone.clone()  # a connection of its own, kept idle
        keep_alive(host, port)
        self._sock: socket.socket | None = None
        for sock in _connections(host, port):
            if self._sock is None and _inode(sock) not in before:
                self._sock = sock
            else:
                sock.close()
        self.thread = threading.Thread(target=self._watch, name="syncdeco-storewatch", daemon=True)

    def start(self) -> None:
        """Start watching (where the canary's connection was found).  The
        thread needs no stopping: it ends when the store closes the canary,
        or with the store's host."""
        if self._sock is not None and self.thread.ident is None:
            self.thread.start()

    def _watch(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLERR | select.POLLHUP | select.POLLIN)
        try:
            while True:
                if not poller.poll():
                    continue
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error == errno.ETIMEDOUT:
                    self.lost_at = time.monotonic()
                    _silenced.add((self.host, self.port))
                    _log.debug("syncdeco: the store's host %s went silent", self.host)
                    self._cut()
                    if self.on_lost is not None:
                        self.on_lost(self.host)
                return  # ended (the store's process closed it, or it was lost)
        except OSError:
            return
        finally:
            sock.close()

    def _cut(self) -> None:
        """Shut down every connection of this process to the store: each
        store call blocked on one fails now."""
        for other in _connections(self.host, self.port):
            with other, contextlib.suppress(OSError):
                other.shutdown(socket.SHUT_RDWR)


def _socket_inodes() -> set[str]:
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    inodes: set[str] = set()
    for name in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{name}")
            if link.startswith("socket:"):
                inodes.add(link)
    return inodes


def _inode(sock: socket.socket) -> str:
    # A duplicate names the same socket: its link in /proc is the original's.
    try:
        return os.readlink(f"/proc/self/fd/{sock.fileno()}")
    except OSError:
        return ""


def silent(host: str, port: int, *, wait: float = 1.0) -> bool:
    """Whether ``host`` is silent: a new connection to ``host:port`` gets
    no answer within ``wait`` seconds.  Asked after a connection to the
    store failed, to tell a lost host (silent) from a store whose process
    ended on a host that is up (it refuses the connection at once).
    True at once where a :class:`StoreWatch` found it silent."""
    if (host, port) in _silenced:
        return True
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(wait)
            probe.connect(address)  # one address, one try: ``wait`` at most
            return False
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # timed out, or no route to the host


def went_silent(exc: BaseException, store: Any) -> bool:
    """Whether a connection to ``store`` failed (``exc``) because its host
    went silent (the kernel gave up on it), rather than because the store's
    process ended on a host that is still up."""
    if "timed out" in str(exc).lower():
        return True
    at = endpoint(store)
    return at is not None and silent(*at)


def _unmapped(address: str) -> str:
    return address.removeprefix("::ffff:")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        (socket.TCP_KEEPIDLE, IDLE),
        (socket.TCP_KEEPINTVL, INTERVAL),
        (socket.TCP_KEEPCNT, PROBES),
        (getattr(socket, "TCP_USER_TIMEOUT", 18), UNACKED * 1000),
        (_THIN_LINEAR_TIMEOUTS, 1),
    ):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
