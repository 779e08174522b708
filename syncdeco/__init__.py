"""syncdeco: rank-coordination decorators for torch.distributed that never hang.

>>> import syncdeco as sd
>>> @sd.main_first
... def load(): ...
"""

import atexit
import sys
from typing import TYPE_CHECKING

from ._backend import (
    DEFAULT,
    Backend,
    Failure,
    NullBackend,
    SyncPoint,
    Timeout,
)
from ._decorate import (
    BarrierAfter,
    MainFirst,
    OnMainOnly,
    barrier,
    barrier_after,
    is_main,
    local_rank,
    main_first,
    on_main_only,
    rank,
    world_size,
)
from ._env import LaunchEnvError
from ._errors import (
    CompositionError,
    PeerFailedError,
    RankExitedError,
    RankKilledError,
    RankLostError,
    SyncError,
    SyncMismatchError,
    SyncTimeoutError,
)
from ._save import atomic_save
from ._select import get_backend, init, use_backend
from ._tracing import trace

if TYPE_CHECKING:
    from ._plane.backend import TorchBackend

__version__ = "0.1.0"


def _at_exit() -> None:
    # syncdeco's one exit handler, registered at import, so that atexit
    # handlers registered later (which atexit runs first) may still reach
    # sync points, with the death watch and the stack responders up, before
    # any of syncdeco's exit runs (group.at_exit).  Nothing to do if
    # syncdeco never used torch; a stack responder started outside a
    # session (benchmarks/where.py) still ends.
    group = sys.modules.get("syncdeco._plane.group")
    if group is not None:
        group.at_exit()
        return
    stacks = sys.modules.get("syncdeco._plane.stacks")
    if stacks is not None:
        stacks.end_all()


atexit.register(_at_exit)


def __getattr__(name: str) -> object:
    # torch is imported on first use, not by `import syncdeco`: the pytest
    # plugin is loaded into every pytest run of an environment that has
    # syncdeco installed, and importing torch costs most of a second.
    if name == "TorchBackend":
        from ._plane.backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module 'syncdeco' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT",
    "Backend",
    "BarrierAfter",
    "CompositionError",
    "Failure",
    "LaunchEnvError",
    "MainFirst",
    "NullBackend",
    "OnMainOnly",
    "PeerFailedError",
    "RankExitedError",
    "RankKilledError",
    "RankLostError",
    "SyncError",
    "SyncMismatchError",
    "SyncPoint",
    "SyncTimeoutError",
    "Timeout",
    "TorchBackend",
    "atomic_save",
    "barrier",
    "barrier_after",
    "get_backend",
    "init",
    "is_main",
    "local_rank",
    "main_first",
    "on_main_only",
    "rank",
    "trace",
    "use_backend",
    "world_size",
]
