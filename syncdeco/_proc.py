"""What ``/proc`` says of a process on this host (Linux): one reading of
``/proc/PID/stat``, for every place that asks whether a process has ended,
is stopped, or whose child it is."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ended", "stat", "state"]


def stat(pid: int, proc: Path = Path("/proc")) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state,
    parent pid, ...); None where there is no such process.  Any other
    failure to read it (no ``/proc``, no permission) raises ``OSError``.
    ``proc``: another root, such as ``/proc/PID/task`` for a thread."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rfind(")") + 2 :].split()


def state(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``T``, ``Z``, ...); None
    where there is no such process (see :func:`stat`)."""
    fields = stat(pid, proc)
    return fields[0] if fields else None


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone, a zombie not yet reaped, or
    one that cannot be looked at."""
    try:
        return state(pid) in (None, "Z", "X")
    except OSError:
        return True
