"""A rank's uncaught exception on stderr: in one piece, its rank in front.

torch's ``init_process_group()`` wraps ``sys.excepthook`` so that a rank's
traceback is written in one write, each line prefixed with ``[rankN]: ``.
Before a process group exists (syncdeco's first sync point runs over the
launcher's store alone) nothing does: Python's own hook writes a traceback
in many small writes, and two ranks that fail at the same moment on one
terminal come out interleaved.  :func:`install`, called when this process
joins its job's store, puts the same hook in place, in torch's format, so a
traceback reads the same before and after the group is made; once torch's
hook wraps this one, this one leaves the prefix to it.
"""

from __future__ import annotations

import io
import os
import sys
from types import TracebackType
from typing import Any, TextIO

__all__ = ["install", "prefixed"]

_installed: list[int] = []  # the rank this process's hook prefixes, once installed


def prefixed(rank: int, text: str) -> str:
    """``text`` with ``[rankN]: `` before each line that is not empty, as
    torch's hook writes it."""
    return "\n".join(f"[rank{rank}]: {line}" if line else "" for line in text.split("\n"))


def _torch_prefixes() -> bool:
    """Whether torch's hook is the one Python calls (it then prefixes what
    the hooks it wraps write)."""
    hook = sys.excepthook
    return (
        getattr(hook, "__name__", "") == "_distributed_excepthook"
        and getattr(hook, "__module__", "") == "torch.distributed.distributed_c10d"
    )


def install(rank: int) -> None:
    """Write this process's uncaught exception in one piece, prefixed with
    ``rank`` (once per process; not where torch's hook is in place)."""
    if _installed or _torch_prefixes():
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        stream = sys.stderr
        if _torch_prefixes() or stream is None:
            previous(kind, value, tb)
            return
        buffer = io.StringIO()
        sys.stderr = buffer
        try:
            previous(kind, value, tb)
        finally:
            sys.stderr = stream
        _write_whole(stream, prefixed(rank, buffer.getvalue()))

    _installed.append(rank)
    sys.excepthook = hook


def _write_whole(stream: TextIO, text: str) -> None:
    """``text`` on ``stream`` in as few writes as the system allows: one
    ``write()`` to its file descriptor where it has one."""
    try:
        stream.flush()
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured, replaced)
        stream.write(text)
        stream.flush()
        return
    encoding: Any = getattr(stream, "encoding", None) or "utf-8"
    data = text.encode(encoding, "backslashreplace")
    while data:
        data = data[os.write(fd, data) :]
