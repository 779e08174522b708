"""What a rank's exit says: the exception that ended the program, if any.

syncdeco wraps ``sys.excepthook`` once to note the exception that ends the
program: ``sys.last_value`` alone misleads, since pytest and IPython set it
for exceptions they caught.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType

from .._backend import Failure

__all__ = ["exit_failure", "killed_failure", "note_uncaught", "uncaught"]

_uncaught: BaseException | None = None  # what ended the program, seen by the hook
_hook: Callable[..., None] | None = None


def note_uncaught() -> None:
    """Wrap sys.excepthook (once) to note the exception that ends the program."""
    global _hook
    if _hook is not None:
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        global _uncaught
        _uncaught = value
        previous(kind, value, tb)

    _hook = sys.excepthook = hook


def uncaught() -> BaseException | None:
    """The exception that is ending the program, if one is."""
    exc: object = _uncaught
    if exc is None and (_hook is None or sys.excepthook is not _hook):
        # Without syncdeco's hook in place (no sync point ran yet, or another
        # hook replaced it), the interpreter's note is the best there is.
        exc = getattr(sys, "last_value", None)
    return exc if isinstance(exc, BaseException) else None


def killed_failure(rank: int) -> Failure:
    """How the end of ``rank``'s process travels when it could not say so."""
    return Failure(rank, "", "", "", exited=True, killed=True)


def exit_failure(rank: int, exc: BaseException | None) -> Failure:
    """How the exit of ``rank`` travels (with ``exc`` if one ended it)."""
    if exc is None:
        return Failure(rank, "", "", "", exited=True)
    return replace(Failure.from_exception(rank, exc), exited=True)
