"""Which backend a sync point uses: the one place where it is chosen.

A backend is chosen at call time, never at import: an explicit one (set by
:func:`init` or :func:`use_backend`), else an initialised default process
group, else a launcher's environment, else :class:`NullBackend`.  torch is
imported on first need, not by ``import syncdeco``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, Literal

from ._backend import _NULL, DEFAULT, Backend, NullBackend, _Config, _Default, _seconds

__all__ = ["backend_from_name", "get_backend", "init", "reset", "use_backend"]

_scoped: ContextVar[Backend | None] = ContextVar("syncdeco_backend", default=None)


class _NotPlain:
    """Stands for torch's world while the default path is not known plain."""

    _default_pg = True  # never None


# The default path of a plain `python script.py`, resolved once.  Once it
# has found no backend chosen (by init()) and an environment that describes
# no multi-rank job (read once a process), ``_plain`` is torch's own world of
# process groups; then, while no group exists and none has, the answer is
# the Null backend, told by two attribute reads instead of a walk through
# the sync plane.  init(), reset() and a fork set it back to _NotPlain;
# under _Config.lock it is torch's world only while _Config.backend is None.
_plain: Any = _NotPlain
_group: Any = None  # syncdeco._plane.group.SESSIONS, once bound (its last_group)
_forgotten = 0  # times _plain was set back: a resolve that overlapped one is stale


def get_backend() -> Backend:
    """The backend syncdeco would use for a sync point made now."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _plain._default_pg is None and _group.last_group is None:
        return _NULL
    configured = _Config.backend
    if configured is not None:
        return configured
    return _resolve()


def _resolve() -> Backend:
    """The default backend, from the process group or the environment; marks
    the default path plain when it is the Null backend and can be told so
    cheaply from now on."""
    global _plain, _group
    forgotten = _forgotten
    found = _auto_backend(os.environ)
    if found is not None:
        return found
    from ._plane import group

    world = group.group_world()  # None where torch's internals are unknown
    with _Config.lock:
        _group = group.SESSIONS
        if world is not None and _Config.backend is None and forgotten == _forgotten:
            _plain = world
    return _NULL


def _auto_backend(env: Mapping[str, str]) -> Backend | None:
    # Bound on first use, so that `import syncdeco` does not import torch.
    global _auto_backend
    from ._plane.backend import auto_backend

    _auto_backend = auto_backend
    return auto_backend(env)


def backend_from_name(name: str, env: Mapping[str, str]) -> Backend:
    if name == "null":
        return NullBackend()
    if name in ("gloo", "nccl"):
        from ._plane.backend import TorchBackend

        return TorchBackend(name, env=env)
    raise ValueError(f"init(backend={name!r}): expected a Backend, 'null', 'gloo', 'nccl' or None")


def init(
    backend: Backend | str | None = None,
    *,
    timeout: float | timedelta | Literal[_Default.DEFAULT] | None = DEFAULT,
    warn_after: float | timedelta | Literal[_Default.DEFAULT] | None = DEFAULT,
    fail_fast: bool | None = None,
) -> Backend:
    """Choose the backend for this process and the default sync timeout.

    ``backend`` is a :class:`Backend`, ``"null"``, ``"gloo"``, ``"nccl"``, or
    None to pick one now as :func:`get_backend` would (initialising the
    process group from the launcher's environment if needed).  ``timeout``
    is the default for every sync point: seconds, a ``timedelta``, or None
    to wait forever; left out, it stays as it is (30 minutes, unless an
    earlier ``init()`` set it).  ``warn_after``: once
    a sync point has waited this long (default a minute; None: never), a
    warning is logged through ``logging`` once per interval, naming the
    ranks that arrived, those missing and where each was last seen.  Here
    and in every ``timeout=``, ``math.inf`` (or any value of 10**9 seconds,
    about 32 years, or more) means the same as None; NaN, zero and negative
    values are refused with ``ValueError``.

    ``fail_fast``: when a peer is lost (its process killed, its node
    lost) while this rank is outside any sync point (in its own
    collective, computing, loading data), log one error naming the lost
    ranks and end this process with exit code 75, so that the launcher
    ends the job instead of every rank waiting for the collective's
    timeout.  None (the default) leaves it to the ``SYNCDECO_FAIL_FAST``
    environment variable (``1``/``0``), and on where that is unset.

    Not a collective by itself, but with a launcher's environment and no
    process group yet, it is a sync point (``syncdeco.init``, with this
    ``timeout``) that brings the group up once every rank has reached it:
    every rank must call it, and a rank that does not come is named.
    """
    if timeout is not DEFAULT:
        seconds = _seconds(timeout, "init(timeout=...)")
    else:
        seconds = _Config.timeout
    if warn_after is not DEFAULT:
        warn = _seconds(warn_after, "init(warn_after=...)")
    else:
        warn = _Config.warn_after
    if fail_fast is not None and not isinstance(fail_fast, bool):
        raise TypeError(f"init(fail_fast=...) takes True, False or None, not {fail_fast!r}")
    chosen: Backend
    _forget_environment()
    if backend is None:
        chosen = _auto_backend(os.environ) or _NULL
    elif isinstance(backend, str):
        chosen = backend_from_name(backend, os.environ)
    elif isinstance(backend, Backend):
        chosen = backend
    else:
        raise TypeError(
            f"init(backend=...) takes a Backend, 'null', 'gloo', 'nccl' or None, "
            f"not {type(backend).__name__}"
        )
    with _Config.lock:
        _Config.fail_fast = fail_fast  # before the group: its watches read it
    prepare = getattr(chosen, "ensure_group", None)
    if prepare is not None:
        prepare(timeout=seconds)  # a sync point, where no group exists yet
    with _Config.lock:
        _Config.backend = chosen
        _Config.timeout = seconds
        _Config.warn_after = warn
        _forget_plain()
    return chosen


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    """Use ``backend`` for sync points inside the ``with`` block (this
    thread or task only), then go back to the previous choice."""
    if not isinstance(backend, Backend):
        raise TypeError(
            f"use_backend() takes a Backend (NullBackend(), TorchBackend() or your "
            f"own), not {type(backend).__name__}"
        )
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)


def _forget_plain() -> None:
    global _plain, _forgotten
    _plain = _NotPlain
    _forgotten += 1


def _forget_environment() -> None:
    import sys

    _forget_plain()
    group = sys.modules.get("syncdeco._plane.group")
    if group is not None:  # nothing read yet if the sync plane was never loaded
        group.forget_environment()


# A forked child reads its own environment (see group._forget_in_child).
os.register_at_fork(after_in_child=_forget_plain)


def reset() -> None:
    """Forget :func:`init`'s choices and the environment read so far (for
    tests and notebooks)."""
    _forget_environment()
    with _Config.lock:
        _Config.backend = None
        _Config.reset()
        _forget_plain()
