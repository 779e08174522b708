"""Saving a file so that a crash mid-save never leaves a half-written one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["atomic_save"]

T = TypeVar("T")


def atomic_save(
    obj: T,
    path: str | os.PathLike[str],
    *,
    save: Callable[[T, IO[bytes]], Any] | None = None,
) -> Path:
    """Write ``obj`` to ``path`` with ``save`` (default ``torch.save``) so that
    ``path`` holds either the previous file or the complete new one, never a
    half-written one, even if the process is killed mid-save.

    It writes to a temporary file in the same directory, flushes it to disk,
    then renames it over ``path`` (an atomic replace on POSIX and Windows).
    Not a sync point: call it from one rank, typically under
    ``@barrier_after`` over ``@on_main_only``.  Returns ``path``.
    """
    if save is None:
        import torch  # imported here so that `import syncdeco` stays light

        save = torch.save
    target = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # named by the path asked for, not the temporary file's
        if exc.errno is None or isinstance(exc, FileExistsError):  # (no names left)
            raise
        why = f"{exc.strerror} (atomic_save writes a temporary file in {target.parent} first)"
        raise type(exc)(exc.errno, why, str(target)) from exc
    try:
        with os.fdopen(fd, "wb") as tmp:
            _chmod_like_open(tmp.fileno(), target)
            save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def _chmod_like_open(fd: int, target: Path) -> None:
    # mkstemp makes the file private (0600); give it the mode open() would
    # have: the old file's, or what the umask allows.  Where the filesystem
    # or the platform cannot (no os.fchmod on Windows before 3.13), keep it.
    if not hasattr(os, "fchmod"):
        return
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    with contextlib.suppress(OSError):
        os.fchmod(fd, mode)


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
