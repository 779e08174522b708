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
that a failure elsewhere reaches a node whose main has not come yet.  The
look is made from the rank's watcher thread (``watch.py``), not by cutting
the waiting thread's store wait short: a store client logs every wait that
times out.

:class:`NodeTier` owns this rank's part of the tier (whether the job uses
one, the store it hosts, its node once the tier is up); the exchange asks
it, and the protocol's rules see only its :class:`~.protocol.Layout`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, cast, final

import torch.distributed as dist

from .._backend import SyncPoint
from .._errors import SyncError
from .._loopback import LOOPBACK, host_on_loopback
from .protocol import Layout, Place
from .transport import Transport

__all__ = [
    "POLL",
    "NodeTier",
    "Tier",
    "host_store",
    "join_store",
    "uses_tiers",
]

_log = logging.getLogger("syncdeco")

POLL: Final = 4.0  # seconds between a waiting node's looks at the job's store
JOIN_TIMEOUT: Final = 30.0  # seconds to connect to the node's store (its main is up)


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

    @property
    def layout(self) -> Layout:
        """The tier as the protocol's rules see it (no stores)."""
        return Layout(self.main, self.members, self.slots, self.zero)


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


@final
class NodeTier:
    """One rank's part in the node tier, and the state it owns: whether the
    job may use one (``enabled``; settled for good once the tier would
    rise), whether this rank said where it lives (``announced``), the node
    store it hosts (``hosted``: a node's main), and its node once the tier
    is up (``tier``, and ``mail``: frames and verdicts over the node's
    store)."""

    __slots__ = (
        "announced",
        "enabled",
        "host_node",
        "hosted",
        "join_node",
        "mail",
        "place",
        "prefix",
        "rank",
        "store",
        "tier",
        "transport",
    )

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        place: Place,
        prefix: str,
        *,
        enabled: bool,
        transport: Callable[[Any], Transport],
        host_node: Callable[[], tuple[Any, int]] = host_store,
        join_node: Callable[[int], Any] = join_store,
    ) -> None:
        self.store, self.rank, self.place, self.prefix = store, rank, place, prefix
        self.transport = transport
        self.host_node, self.join_node = host_node, join_node
        self.enabled = enabled and uses_tiers(world_size, place.local_size)
        self.announced = False
        self.hosted: tuple[Any, int] | None = None
        self.tier: Tier | None = None
        self.mail: Transport | None = None

    def due(self) -> bool:
        """Whether this rank must say where it lives (before its first frame)."""
        return self.enabled and not self.announced

    def announce(self) -> None:
        """Before this rank's first frame: a node's main hosts the node's
        store and says where it is; rank 0 says where it lives."""
        self.announced = True
        prefix, place, store = self.prefix, self.place, self.store
        keys: list[str] = []
        values: list[bytes] = []
        if place.local_rank == 0 and (place.local_size or 0) > 1:
            _, port = self.hosted = self.host_node()
            keys.append(f"{prefix}/nodestore/{place.node}")
            values.append(str(port).encode())
        if self.rank == 0:
            keys.append(f"{prefix}/mainnode")
            values.append(pickle.dumps((place.node, place.local_size, place.local_rank)))
        if keys:
            store.multi_set(keys, values)
        if place.local_rank == 0:
            store.append(f"{prefix}/mains", f"{self.rank},")

    def ready(self, world_met: bool) -> bool:
        """Whether the tier should rise at this world sync point: every
        rank met at one since each said where it lives."""
        return self.enabled and world_met and self.tier is None

    def rise(self, point: SyncPoint) -> Tier | None:
        """This rank's node, from the facts every rank wrote before its
        first frame (all there: every rank met at a world sync point since).
        None, and one store from now on, where rank 0 is not its node's
        main."""
        prefix, place, job = self.prefix, self.place, self.store
        size = place.local_size or 0
        keys = [f"{prefix}/node/{place.node}/{lr}" for lr in range(size)]
        if size > 1:
            keys.append(f"{prefix}/nodestore/{place.node}")
        keys += [f"{prefix}/mains", f"{prefix}/mainnode"]
        if not job.check(keys):
            absent = [k for k in keys if not job.check([k])]
            raise SyncError(
                f"rank {self.rank} at {point.describe()}: the ranks of its node "
                f"({place.node}) did not all say where they live before meeting: "
                f"{len(absent)} of {len(keys)} keys are missing ({', '.join(absent)}). The "
                f"launcher's LOCAL_RANK and LOCAL_WORLD_SIZE (or OMPI_COMM_WORLD_LOCAL_"
                f"RANK/SIZE, or SLURM_LOCALID and SLURM_STEP_TASKS_PER_NODE at "
                f"SLURM_NODEID) must number each node's ranks 0 to n-1 on every node."
            )
        *ranks, mains, main_node = job.multi_get(keys)
        port = ranks.pop() if size > 1 else None
        node = [int(r) for r in ranks]
        node0, size0, local0 = pickle.loads(main_node)
        if local0 != 0 or size0 is None or size0 < 2:
            self.enabled = False  # every rank reads the same facts: all keep to one store
            return None
        zero = [
            int(r) for r in job.multi_get([f"{prefix}/node/{node0}/{lr}" for lr in range(size0)])
        ]
        heads = {int(r) for r in bytes(mains).decode().split(",") if r}
        slots = tuple(sorted((heads | set(zero)) - {0}))
        main, members = node[0], tuple(node[1:])
        store: Any = None
        spare: Any = None
        if not members:
            pass  # a node of one rank: nobody to relay to
        elif self.rank == main:
            store = cast(tuple[Any, int], self.hosted)[0]
            spare = store.clone()
        else:
            try:
                store = self.join_node(int(bytes(port or b"0")))
                spare = store.clone()
            except Exception as exc:  # its main is gone: the job's store says so
                _log.debug("rank %d could not reach its node's store: %r", self.rank, exc)
                store = spare = None
        tier = self.tier = Tier(store, spare, main, members, slots, tuple(sorted(zero)))
        if store is not None:
            self.mail = self.transport(store)
        return tier

    def cut_off(self) -> None:
        """This rank lost its node's store (its node's main is gone): from
        now on it waits for rank 0's verdict on the job's store."""
        if self.tier is not None:
            self.tier.store = None
        self.mail = None
