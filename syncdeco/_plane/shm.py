"""The files a node's main rank writes in ``/dev/shm``: their names, whether
a result fits, and sweeping up after processes that ended without
unlinking theirs.

A file is named ``syncdeco-<pid namespace>-<pid>-<random>`` after the
process that wrote it.  Its node's last rank to take the result unlinks it
(``pernode``); a process killed in between leaves it, so before writing a
new file, and at interpreter exit, a rank unlinks the files of processes of
its own pid namespace that have ended (:func:`sweep`).  A file whose writer
lives in another pid namespace (a container sharing this ``/dev/shm``) is
never touched: its pid means nothing here.

Whether a result fits is :func:`fits`, over plain numbers: a result that
would leave less than a sixteenth of the file system free is sent another
way (``pernode``), so that a DataLoader's workers and NCCL, which need
``/dev/shm`` too, still find room.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Sequence
from typing import Final

__all__ = ["fits", "name", "new_path", "owner", "room", "sweep", "unlink", "write"]

DIR: Final = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_PREFIX: Final = "syncdeco-"
_PAGE: Final = 4096
_RESERVE: Final = 16  # a result leaves at least 1/_RESERVE of the file system free


def pid_namespace() -> int:
    """This process's pid namespace (0 where it cannot be read: not Linux)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def fits(size: int, free: int, total: int) -> bool:
    """Whether a file of ``size`` bytes fits in a file system with ``free``
    of ``total`` bytes free, leaving a sixteenth of it for others."""
    pages = -(-size // _PAGE) * _PAGE
    return pages + total // _RESERVE <= free


def room(directory: str) -> tuple[int, int]:
    """(free, total) bytes of the file system holding ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def name(pid_ns: int, pid: int, token: str) -> str:
    return f"{_PREFIX}{pid_ns}-{pid}-{token}"


def owner(filename: str) -> tuple[int, int] | None:
    """(pid namespace, pid) of the process that wrote ``filename``, if it is
    one of syncdeco's files named as :func:`name` names them."""
    if not filename.startswith(_PREFIX):
        return None
    parts = filename[len(_PREFIX) :].split("-")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


def new_path(directory: str) -> str:
    return os.path.join(directory, name(pid_namespace(), os.getpid(), secrets.token_hex(6)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # someone else's process (EPERM), or no pid at all: leave it be
    return True


def sweep(directory: str) -> list[str]:
    """Unlink the files left in ``directory`` by processes of this pid
    namespace that have ended; returns their paths.  Never raises: it runs
    at interpreter exit too."""
    pid_ns = pid_namespace()
    if not pid_ns:
        return []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    swept = []
    for filename in names:
        who = owner(filename)
        if who is not None and who[0] == pid_ns and not _alive(who[1]):
            path = os.path.join(directory, filename)
            try:
                if unlink(path):
                    swept.append(path)
            except OSError:
                pass  # another user's file (a sticky /dev/shm): theirs to remove
    return swept


def write(path: str, views: Sequence[memoryview], offsets: Sequence[int], size: int) -> None:
    """Write ``views`` at ``offsets`` into a new file of ``size`` bytes at
    ``path``.  On a full file system a write raises OSError (ENOSPC): the
    file is written, not mapped, so that running out is an error and not a
    SIGBUS."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        for data, at in zip(views, offsets, strict=True):
            while data:  # a write to a file in memory writes all, but a write may be partial
                done = os.pwrite(fd, data, at)
                data, at = data[done:], at + done
    finally:
        os.close(fd)


def unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
