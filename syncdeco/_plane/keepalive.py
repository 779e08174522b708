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
which the exchange turns into an error naming the store's host.  A link
that drops every packet for 3 s does not drop the connection: 3 s of lost
probes are at most 4 of the 5, and 3 s is under :data:`UNACKED`.

The connections are found by their peer, the store's address and port, in
``/proc/self/fd`` (a c10d store does not expose its socket), and tuned
through a duplicate of each descriptor: options belong to the socket, so
the duplicate's are the original's.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Final

__all__ = ["endpoint", "keep_alive"]

IDLE: Final = 2  # seconds of silence before the first probe
INTERVAL: Final = 1  # seconds between probes
PROBES: Final = 5  # unanswered probes that drop the connection
UNACKED: Final = 8  # seconds a request may go unacknowledged
_THIN_LINEAR_TIMEOUTS: Final = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)  # Linux


def endpoint(store: Any) -> tuple[str, int] | None:
    """The (host, port) of the TCP store under ``store`` (prefix stores
    unwrapped), or None for another kind of store."""
    for _ in range(8):
        underlying = getattr(store, "underlying_store", None)
        if underlying is None:
            break
        store = underlying
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
    peers = _addresses(host)
    tuned = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for name in fds:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with dup:
            try:
                if dup.type != socket.SOCK_STREAM or dup.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                peer = dup.getpeername()
            except OSError:
                continue  # not connected (a listening socket, say)
            if peer[1] != port or not {peer[0], _unmapped(peer[0])} & peers:
                continue
            _tune(dup)
            tuned += 1
    return tuned


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
