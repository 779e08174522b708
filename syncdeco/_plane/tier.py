"""The node tier: a store per node, so that a world sync point's node-local
traffic never reaches the job's store.

From the world sync point after the first one that succeeds, a job whose
nodes run several ranks each syncs in two levels::

    job store (rank 0's, or the launcher's)
      |-- rank 0, the main: waits for its own node's ranks and every other
      |   node's main, in one wait
      |-- node main (local rank 0) of node 1 --- node 1's store (hosted by it)
      |                                            `-- the node's other ranks
      `-- node main of node 2 ...

* each node's main hosts a store of its own (a TCPStore on a port the
  kernel picks, as Gloo picks its own) and publishes the port on the job's
  store; the node's other ranks reach it over loopback;
* the node's ranks send their frames to their node's main, which sends rank
  0 one frame for the whole node (their frames, and who did not come in
  time), waits for the verdict on the job's store, and relays it to them;
* ``local=True`` sync points stay on the node's store.

A node's main that dies takes its store with it: its ranks, cut off, wait
for the verdict on the job's store instead, where the exit is reported
(by the main itself, or by a rank of its node that saw its process end).
While a node waits, one of its ranks looks at the job's store for a verdict
once every :data:`POLL` seconds (the node's main while it waits for its
ranks, and its first other rank while that waits for the relay), so that a
failure elsewhere reaches a node whose main has not come yet.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, final

import torch.distributed as dist

from .protocol import Frame

__all__ = [
    "POLL",
    "Tier",
    "host_store",
    "join_store",
    "node_frame",
    "read_frame",
    "uses_tiers",
]

POLL: Final = 2.0  # seconds between a waiting node's looks at the job's store
JOIN_TIMEOUT: Final = 30.0  # seconds to connect to the node's store (its main is up)
NODE: Final = "node"  # the first item of a node frame


@final
@dataclass(slots=True)
class Tier:
    """This rank's node, once the node tier is up."""

    store: Any  # a connection to the node's store; None: unreachable (its main is gone)
    spare: Any  # another, for other threads (an exit notice while a sync point waits)
    main: int  # the node's main rank
    members: tuple[int, ...]  # the node's other ranks
    slots: tuple[int, ...]  # whom rank 0 waits for on the job's store

    def direct(self) -> bool:
        """Whether this rank meets rank 0 on the job's store (rank 0's own
        node), instead of through its node's main."""
        return self.main == 0


def uses_tiers(world_size: int, local_size: int | None) -> bool:
    """Whether a job syncs through a store per node: its launcher says how
    many ranks a node runs, and there are several nodes of several ranks."""
    return local_size is not None and 1 < local_size < world_size


def host_store() -> tuple[Any, int]:
    """A store for this node, hosted here: (the store, its port)."""
    # torch re-exports TCPStore without declaring it
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        use_libuv=True,
        timeout=timedelta(seconds=JOIN_TIMEOUT),
    )
    return store, int(store.port)


def join_store(port: int) -> Any:
    """A connection to this node's store, hosted by the node's main."""
    return dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1",
        port,
        is_master=False,
        wait_for_workers=False,
        timeout=timedelta(seconds=JOIN_TIMEOUT),
    )


def node_frame(
    frames: Sequence[Frame], missing: Sequence[int], seen: Mapping[int, str | None]
) -> bytes:
    """What a node's main sends rank 0: its node's frames, the ranks that did
    not come in time, and where it last saw them."""
    return pickle.dumps(
        (NODE, [tuple(f) for f in frames], tuple(missing), dict(seen)),
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def read_frame(data: bytes) -> tuple[list[Frame], list[int], dict[int, str | None]]:
    """A frame on the job's store: (frames, missing ranks, where those were
    last seen); a rank's own frame, or a node's."""
    obj = pickle.loads(data)
    if obj[0] == NODE:
        return [Frame(*f) for f in obj[1]], list(obj[2]), dict(obj[3])
    return [Frame(*obj)], [], {}
