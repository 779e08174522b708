"""The stores syncdeco hosts itself, listening on loopback only.

Two stores are syncdeco's own rather than the job's: the store each node's
main hosts for its node (``syncdeco._plane.tier``), and the store a world of
one rank hosts for itself (``syncdeco._startup``).  Only their own node
connects to them, over 127.0.0.1, and what they carry is unpickled by the
ranks that read it; a c10d ``TCPStore`` server binds every interface,
whatever host name it is given.  So the listening socket is made here,
bound to 127.0.0.1, and handed to the server (``master_listen_fd``): no
other host can connect.

The job's own store (rank 0's at MASTER_ADDR:MASTER_PORT, or the launcher
agent's) is the one ``torch.distributed``'s rendezvous opens too, reached
by every node: syncdeco opens it as torch does and adds no other.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["LOOPBACK", "host_on_loopback"]

LOOPBACK = "127.0.0.1"
_BACKLOG = 1024  # a node's ranks connect at about the same time


def host_on_loopback(*, world_size: int | None, seconds: float, use_libuv: bool = True) -> Any:
    """A ``TCPStore`` server hosted by this process on 127.0.0.1, on a port
    the kernel picks (``store.port``).  It does not wait for its clients."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(_BACKLOG)
        port = int(listener.getsockname()[1])
        # torch re-exports TCPStore without declaring it
        store = dist.TCPStore(  # type: ignore[attr-defined]
            LOOPBACK,
            port,
            world_size,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=seconds),
            use_libuv=use_libuv,
            master_listen_fd=listener.fileno(),
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the server owns the socket now, and closes it with itself
    return store
