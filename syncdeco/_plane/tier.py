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
While a node waits, two of its ranks look at the job's store for a verdict
once every :data:`POLL` seconds each (the node's main while it waits for
its ranks, and its first other rank while that waits for the relay), so
that a failure elsewhere reaches a node whose main has not come yet.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, cast, final

import torch.distributed as dist

from .._backend import SyncPoint
from .._errors import SyncError
from .._loopback import LOOPBACK, host_on_loopback
from .protocol import Agreed, Frame, agrees

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = [
    "POLL",
    "Tier",
    "announce",
    "host_store",
    "join_store",
    "members_key",
    "node_frame",
    "raise_tier",
    "read_frame",
    "uses_tiers",
]

_log = logging.getLogger("syncdeco")

POLL: Final = 4.0  # seconds between a waiting node's looks at the job's store
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
    zero: tuple[int, ...] = (0,)  # the ranks of rank 0's node

    def direct(self) -> bool:
        """Whether this rank meets rank 0 on the job's store (rank 0's own
        node), instead of through its node's main."""
        return self.main == 0


def uses_tiers(world_size: int, local_size: int | None) -> bool:
    """Whether a job may sync through a store per node: its launcher says
    how many ranks this node runs, and there are other nodes.  (Whether it
    does is settled at the second world sync point, on facts every rank
    reads alike: rank 0 must be its node's main, on a node of several.)"""
    return local_size is not None and local_size < world_size


def host_store() -> tuple[Any, int]:
    """A store for this node, hosted here on loopback (only its node
    connects): (the store, its port)."""
    store = host_on_loopback(world_size=None, seconds=JOIN_TIMEOUT)
    return store, int(store.port)


def join_store(port: int) -> Any:
    """A connection to this node's store, hosted by the node's main."""
    return dist.TCPStore(  # type: ignore[attr-defined]
        LOOPBACK,
        port,
        is_master=False,
        wait_for_workers=False,
        timeout=timedelta(seconds=JOIN_TIMEOUT),
    )


def members_key(prefix: str, main: int) -> str:
    """Where a node's main writes its node's other ranks, once the tier is up."""
    return f"{prefix}/members/{main}"


def node_frame(
    frames: Sequence[Frame], missing: Sequence[int], seen: Mapping[int, str | None]
) -> bytes:
    """What a node's main sends rank 0: its node's frames (the main's own
    first), the ranks that did not come in time, and where it last saw
    them.  The frames that agree with the main's own (the same sync point,
    no failure: at nearly every sync point, all of them) travel as one
    group per place they were seen at; the others as they are."""
    point = (frames[0].seq, frames[0].kind, frames[0].name, frames[0].call)
    odd: list[tuple[object, ...]] = []
    same: dict[str, list[Frame]] = {}
    for frame in frames:
        if agrees(frame, point):
            same.setdefault(frame.where, []).append(frame)
        else:
            odd.append(tuple(frame))
    groups = [tuple(Agreed.of(group)) for group in same.values()]
    return pickle.dumps(
        (NODE, odd, tuple(missing), dict(seen), groups), protocol=pickle.HIGHEST_PROTOCOL
    )


def read_frame(
    data: bytes,
) -> tuple[list[Frame], list[int], dict[int, str | None], list[Agreed]]:
    """A frame on the job's store, a rank's own or a node's: (frames, missing
    ranks, where those were last seen, groups of ranks whose frames agree)."""
    obj = pickle.loads(data)
    if obj[0] == NODE:
        return [Frame(*f) for f in obj[1]], list(obj[2]), dict(obj[3]), [Agreed(*g) for g in obj[4]]
    return [Frame(*obj)], [], {}, []


# -- bringing the tier up -----------------------------------------------------------


def announce(ex: Exchange) -> None:
    """Before this rank's first frame: a node's main hosts the node's
    store and says where it is; rank 0 says where it lives."""
    ex.announced = True
    prefix, place = ex.prefix, ex.place
    keys: list[str] = []
    values: list[bytes] = []
    if place.local_rank == 0 and (place.local_size or 0) > 1:
        _, port = ex.hosted = ex.host_node()
        keys.append(f"{prefix}/nodestore/{place.node}")
        values.append(str(port).encode())
    if ex.rank == 0:
        keys.append(f"{prefix}/mainnode")
        values.append(pickle.dumps((place.node, place.local_size, place.local_rank)))
    if keys:
        ex.store.multi_set(keys, values)
    if place.local_rank == 0:
        ex.store.append(f"{prefix}/mains", f"{ex.rank},")


def raise_tier(ex: Exchange, point: SyncPoint) -> Tier | None:
    """This rank's node, from the facts every rank wrote before its first
    frame (all there: every rank met at a world sync point since).  None,
    and one store from now on, where rank 0 is not its node's main."""
    prefix, place = ex.prefix, ex.place
    size = cast(int, place.local_size)
    keys = [f"{prefix}/node/{place.node}/{lr}" for lr in range(size)]
    if size > 1:
        keys.append(f"{prefix}/nodestore/{place.node}")
    keys += [f"{prefix}/mains", f"{prefix}/mainnode"]
    if not ex.store.check(keys):
        here = [k for k in keys if ex.store.check([k])]
        raise SyncError(
            f"rank {ex.rank} at {point.describe()}: the ranks of its node "
            f"({place.node}) did not all say where they live before meeting: "
            f"{len(keys) - len(here)} of {', '.join(keys)} are missing. The "
            f"launcher's LOCAL_RANK and LOCAL_WORLD_SIZE (or OMPI_COMM_WORLD_LOCAL_"
            f"RANK/SIZE, or SLURM_LOCALID and SLURM_STEP_TASKS_PER_NODE at "
            f"SLURM_NODEID) must number each node's ranks 0 to n-1 on every node."
        )
    *ranks, mains, main_node = ex.store.multi_get(keys)
    port = ranks.pop() if size > 1 else None
    node = [int(r) for r in ranks]
    node0, size0, local0 = pickle.loads(main_node)
    if local0 != 0 or size0 is None or size0 < 2:
        ex.tiers = False  # every rank reads the same facts: all keep to one store
        return None
    zero = [
        int(r) for r in ex.store.multi_get([f"{prefix}/node/{node0}/{lr}" for lr in range(size0)])
    ]
    heads = {int(r) for r in bytes(mains).decode().split(",") if r}
    slots = tuple(sorted((heads | set(zero)) - {0}))
    main, members = node[0], tuple(node[1:])
    store: Any = None
    spare: Any = None
    if not members:
        pass  # a node of one rank: nobody to relay to
    elif ex.rank == main:
        hosted = ex.hosted[0]
        store, spare = hosted, hosted.clone()
        # For a timeout that finds this node's main missing: its ranks too.
        ex.store.set(members_key(prefix, main), ",".join(map(str, members)))
    else:
        try:
            store = ex.join_node(int(cast(bytes, port)))
            spare = store.clone()
        except Exception as exc:  # its main is gone: the job's store says so
            _log.debug("rank %d could not reach its node's store: %r", ex.rank, exc)
            store = spare = None
    tier = Tier(store, spare, main, members, slots, tuple(sorted(zero)))
    if store is not None:
        ex.node_mail = type(ex.mail)(store)  # type: ignore[call-arg]
    return tier
