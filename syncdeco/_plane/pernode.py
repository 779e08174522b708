"""Results once per node: a broadcast result's tensors through shared memory.

The main rank sends a result's tensors to each node's main only (over a
Gloo group of the node mains, made once, by every rank, at the first sync
point that needs it); each node's main writes them into one file in
``/dev/shm`` and tells the ranks of its node where it is, through the
store.  A rank then either copies them out (``on_main_only(broadcast=True)``:
every rank its own copy) or maps the file (``share=True``: every rank of the
node the same memory).  The last rank of the node to have mapped or copied
the file unlinks it, so the memory goes back to the system when the last
tensor over it is dropped, and nothing is left in ``/dev/shm`` (unless a
rank of the node is killed between its main's write and its own mapping:
then the file stays until a later sweep, see ``shm``).

Where the file does not fit in ``/dev/shm`` (``shm.fits``), or cannot be
written, the node's main puts the tensors in its node's store instead, in
pieces the store takes (4 MiB), and each rank of the node copies them out:
slower, and not shared, but the result arrives.  The node's main logs a
warning, once per process, naming the size and Docker's ``--shm-size``.

``share=True`` shares CPU memory: a result holding a CUDA tensor is refused
(ValueError on the main rank, PeerFailedError on the others) rather than
copied through the CPU behind the user's back.

Plans (the verdict's last item says which one the members follow):

* ``BCAST``: every rank receives each tensor by a broadcast over the world
  (NCCL moves CUDA tensors better than this module could; simulated ranks);
* ``NODE``: once per node, then copied out of shared memory (in a job of
  one node, where nothing crosses a network: a broadcast over the world);
* ``SHARE``: once per node, and the node's ranks map the same memory.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import pickle
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, final

import torch
import torch.distributed as dist

from .._backend import SyncPoint
from .._errors import SyncError, SyncTimeoutError
from . import shm, wire
from .deadline import Deadline
from .share import Share
from .transport import Late, wait_on
from .wire import Meta

__all__ = ["BCAST", "NODE", "SHARE", "Plan", "prepare", "receive", "send"]

BCAST: Final = "bcast"
NODE: Final = "node"
SHARE: Final = "share"
Plan = tuple[str, list[Meta]]  # how the tensors travel, and what they are

_ALIGN: Final = 64  # a multiple of every dtype's size, and of a cache line
_CPU: Final = torch.device("cpu")
_FAILED: Final = b"!"  # a published value that starts so is an error, not a path
_log = logging.getLogger("syncdeco")


@final
@dataclass(frozen=True, slots=True)
class Node:
    """This rank's node, as the world scope sees it: its main, the other
    ranks (on the node's main only), and the group of every node's main."""

    main: int
    members: tuple[int, ...]
    mains: Any  # a ProcessGroup, or None with a single node


_nodes: weakref.WeakKeyDictionary[Any, Node] = weakref.WeakKeyDictionary()


def prepare(
    exchange: Any, payload: object, world: bool, point: SyncPoint
) -> tuple[bytes, Plan, list[torch.Tensor]]:
    """The main rank's side, before the verdict: the payload pickled with its
    tensors taken out, how they will travel, and the tensors as they will be
    sent.  Raises (and the others hear of it) where that cannot be done."""
    share = isinstance(payload, Share)
    value = payload.value if isinstance(payload, Share) else payload
    tensors: list[torch.Tensor] = []
    try:
        data = wire.dumps(value, tensors)
    except Exception as exc:
        exc.add_note(
            f"syncdeco: rank {exchange.rank} could not pickle the result of "
            f"{point.describe()} to broadcast it; return something picklable."
        )
        raise
    if not tensors:
        return data, (BCAST, []), []  # (how tensors would travel matters only with some)
    ours = exchange.broadcast is dist.broadcast  # not a simulated rank's broadcast
    if not ours and world:
        mode = BCAST
    elif share:
        mode = SHARE
    elif world and exchange.wire_device().type != "cpu":
        mode = BCAST  # NCCL: CUDA to CUDA, which crosses the network once per node already
    else:
        mode = NODE
    if mode == SHARE:
        for tensor in tensors:
            if tensor.device.type != "cpu":
                raise ValueError(
                    f"rank {exchange.rank} at {point.describe()}: "
                    f"@on_main_only(broadcast=True, share=True) shares CPU memory between "
                    f"the ranks of a node, but the result holds a tensor on "
                    f"{tensor.device} (shape {tuple(tensor.shape)}). Return it on the CPU "
                    f"(tensor.cpu()) and move it to each rank's device after the call, or "
                    f"drop share=True to get a copy on each rank's current device."
                )
    if mode == BCAST:
        device = exchange.wire_device()
        wires = [wire.on_wire(t, device) for t in tensors]
    else:
        wires = [_on_cpu(t) for t in tensors]
    return data, (mode, [wire.meta(t) for t in tensors]), wires


def send(
    exchange: Any,
    seq: int,
    plan: Plan,
    wires: list[torch.Tensor],
    members: Sequence[int],
    world: bool,
    point: SyncPoint,
) -> list[torch.Tensor] | None:
    """The main rank's side, after an OK verdict: send the tensors; with
    ``SHARE``, return them as this rank's shared copies."""
    mode, metas = plan
    if not metas:
        return None
    if mode == BCAST:
        for tensor in wires:  # every member got the shapes in its verdict
            exchange.broadcast(tensor, exchange.rank)
        return None
    key = _key(exchange, world, exchange.rank, seq)
    if world:
        node = _node(exchange)
        if mode == NODE and node.mains is None:
            _across(wires, exchange.rank, None)  # one node: see _across
            return None
        members = node.members
        try:
            if node.mains is not None:
                _across(wires, exchange.rank, node.mains)
        except BaseException as exc:
            _fail(exchange, key, members, exc)
            raise
    return _publish(exchange, key, members, wires, metas, mode, point)


def receive(
    exchange: Any,
    seq: int,
    plan: Plan,
    main: int,
    world: bool,
    point: SyncPoint,
    deadline: Deadline,
) -> list[torch.Tensor]:
    """A member's side, after an OK verdict: this rank's tensors of the
    result, on the wire's device (``wire.off_wire`` puts them in place).
    ``deadline``: the sync point's (:meth:`~.deadline.Deadline.then` gives
    what follows its verdict)."""
    mode, metas = plan
    if not metas:
        return []
    if mode == BCAST:
        tensors = []
        for shape, dtype, *_ in metas:
            buffer = wire.receive_buffer(shape, dtype, exchange.wire_device())
            exchange.broadcast(buffer, main)
            tensors.append(buffer)
        return tensors
    if world:
        node = _node(exchange)
        if mode == NODE and node.mains is None:
            buffers = [wire.receive_buffer(shape, dtype, _CPU) for shape, dtype, *_ in metas]
            _across(buffers, main, None)  # one node: see _across
            return buffers
        if node.main == exchange.rank:  # this node's main: from the main, then on
            buffers = [wire.receive_buffer(shape, dtype, _CPU) for shape, dtype, *_ in metas]
            try:
                _across(buffers, main, node.mains)
            except BaseException as exc:
                _fail(exchange, _key(exchange, world, node.main, seq), node.members, exc)
                raise
            key = _key(exchange, world, exchange.rank, seq)
            shared = _publish(exchange, key, node.members, buffers, metas, mode, point)
            return buffers if shared is None else shared
        main = node.main
    key = _key(exchange, world, main, seq)
    return _take(exchange, key, main, metas, mode, point, deadline.then())


# -- the node mains ---------------------------------------------------------------


def _node(exchange: Any) -> Node:
    """This rank's node in the world, found once: a collective over the
    world, which every rank reaches at the same sync point (the first world
    broadcast with tensors), in step, so it may also make the node mains'
    group."""
    node = _nodes.get(exchange)
    if node is not None:
        return node
    device = exchange.wire_device()
    digest = hashlib.blake2b(exchange.place.node.encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], device=device)
    every = [torch.empty_like(mine) for _ in range(exchange.world_size)]
    dist.all_gather(every, mine)
    keys = [int(t.item()) for t in every]
    first: dict[int, int] = {}  # node -> its lowest rank, its main
    for rank, key in enumerate(keys):
        first.setdefault(key, rank)
    own = keys[exchange.rank]
    main = first[own]
    members = tuple(r for r, k in enumerate(keys) if k == own and r != main)
    mains_ranks = sorted(set(first.values()) | {0})
    # Every rank makes the group (new_group is a collective), members too.
    mains = dist.new_group(mains_ranks, backend="gloo") if len(mains_ranks) > 1 else None
    node = _nodes[exchange] = Node(main, members if main == exchange.rank else (), mains)
    return node


def _across(tensors: Sequence[torch.Tensor], main: int, group: Any) -> None:
    """Broadcast ``tensors`` from ``main`` over ``group`` (the node mains,
    or None: the world), as bytes (Gloo moves no bool, bfloat16 or complex
    tensors).

    The world, for copies in a job of one node: there, a result crosses no
    network, and a broadcast into each rank's buffer (which Gloo runs in
    parallel) was measured faster than the main's copy into shared memory
    followed by each rank's copy out of it (at 2 to 8 ranks on 2 cores:
    57 against 88 ms at 2 ranks, 380 against 405 ms at 8)."""
    for tensor in tensors:
        if tensor.numel():
            dist.broadcast(tensor.reshape(-1).view(torch.uint8), main, group=group)


# -- shared memory on a node ---------------------------------------------------------


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().resolve_conj().resolve_neg().to(_CPU).contiguous()


def _key(exchange: Any, world: bool, node_main: int, seq: int) -> str:
    return f"{exchange.prefix}/shm/{'w' if world else 'l'}/{node_main}/{seq}"


def _layout(metas: Sequence[Meta]) -> tuple[list[int], int]:
    """Where each tensor starts in the node's file, and the file's size."""
    offsets, end = [], 0
    for shape, dtype, *_ in metas:
        offsets.append(end)
        numel = 1
        for n in shape:
            numel *= n
        end += -(-numel * dtype.itemsize // _ALIGN) * _ALIGN
    return offsets, end


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _views(path: str, metas: Sequence[Meta]) -> list[torch.Tensor]:
    """The tensors in the node's file at ``path``, mapped (shared)."""
    offsets, size = _layout(metas)
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=size)
    tensors = []
    for (shape, dtype, *_), offset in zip(metas, offsets, strict=True):
        tensor = torch.empty(0, dtype=dtype)
        tensor.set_(storage, offset // dtype.itemsize, shape)  # type: ignore[call-overload]
        tensors.append(tensor)
    return tensors


def _publish(
    exchange: Any,
    key: str,
    members: Sequence[int],
    tensors: Sequence[torch.Tensor],
    metas: Sequence[Meta],
    mode: str,
    point: SyncPoint,
) -> list[torch.Tensor] | None:
    """A node's main: write ``tensors`` into a new file in shared memory and
    tell the node's other ranks where it is; with ``SHARE``, return this
    rank's mapped copies.  Where the file does not fit (or cannot be
    written), hand them on through the store instead (see :func:`_post`)."""
    offsets, size = _layout(metas)
    if size == 0:  # nothing to share: every tensor is empty
        return (
            [torch.empty(shape, dtype=dtype) for shape, dtype, *_ in metas]
            if mode == SHARE
            else None
        )
    if not members and mode != SHARE:
        return None
    _sweep_at_exit()
    shm.sweep(shm.DIR)
    path = shm.new_path(shm.DIR)
    shared = None
    why: str | None = None  # why not through shared memory
    try:
        free, total = shm.room(shm.DIR)
        if shm.fits(size, free, total):
            shm.write(path, [_bytes(t) for t in tensors], offsets, size)
            shared = _views(path, metas) if mode == SHARE else None
        else:
            why = f"{_mib(free)} free of {_mib(total)}"
    except OSError as exc:  # no room after all (ENOSPC), or no such folder
        shm.unlink(path)
        why = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:
        shm.unlink(path)
        _fail(exchange, key, members, exc)
        if not isinstance(exc, Exception):
            raise
        raise SyncError(
            f"rank {exchange.rank} at {point.describe()} could not hand the result of "
            f"{_options(mode)} ({_mib(size)} of tensors) to the ranks of its node through "
            f"a file in {shm.DIR}: {type(exc).__name__}: {exc}. They raise SyncError too. "
            f"(Too little room there is not this error: the result then goes through the "
            f"store.) Check that {shm.DIR} can be written and mapped by this process."
        ) from exc
    if why is not None:
        _warn_once(exchange.rank, point, mode, size, why)
        try:
            if members:
                _post(exchange.local_store(), key, tensors, len(members))
        except Exception as exc:
            _fail(exchange, key, members, exc)
            raise SyncError(
                f"rank {exchange.rank} at {point.describe()} could not hand the result of "
                f"{_options(mode)} ({_mib(size)} of tensors) to the ranks of its node "
                f"through the store either: {type(exc).__name__}: {exc}. They raise "
                f"SyncError too. Give the node more shared memory (Docker: --shm-size), or "
                f"check that the store's host (torchrun's agent, or rank 0) is still up."
            ) from exc
        return list(tensors) if mode == SHARE else None
    if members:
        exchange.local_store().set(key, pickle.dumps((path, len(members))))
    else:
        shm.unlink(path)  # mapped here, by nobody else: it lives as long as the mapping
    return shared


def _options(mode: str) -> str:
    return "@on_main_only(broadcast=True" + (", share=True)" if mode == SHARE else ")")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


_warned: list[bool] = []  # whether this process has said it falls back (once is enough)


def _warn_once(rank: int, point: SyncPoint, mode: str, size: int, why: str) -> None:
    if _warned:
        return
    _warned.append(True)
    shared = " and not shared: each rank its own copy" if mode == SHARE else ""
    _log.warning(
        "syncdeco: rank %d at %s: the result of %s (%s of tensors) does not fit in %s "
        "(%s), so the ranks of its node get it through the store instead (slower%s). "
        "Give the node more shared memory: a Docker container has 64 MB unless it is "
        "started with a larger --shm-size (e.g. --shm-size=16g); `df -h %s` shows the "
        "room there. Said once per process.",
        rank,
        point.describe(),
        _options(mode),
        _mib(size),
        shm.DIR,
        why,
        shared,
        shm.DIR,
    )


def _sweep_at_exit() -> None:
    """Once per process: sweep ``/dev/shm`` at interpreter exit too."""
    if not _swept:
        _swept.append(True)
        atexit.register(shm.sweep, shm.DIR)


_swept: list[bool] = []


# -- through the store, where shared memory has no room --------------------------------

_PIECE: Final = 4 << 20  # the store takes values of 8 MiB at most (libuv's TCPStore)


def _pieces(tensors: Sequence[torch.Tensor]) -> Iterator[bytes]:
    """The tensors' bytes, one after another, in pieces of ``_PIECE``."""
    piece = bytearray()
    for tensor in tensors:
        data = _bytes(tensor)
        while data:
            take = data[: _PIECE - len(piece)]
            piece += take
            data = data[len(take) :]
            if len(piece) == _PIECE:
                yield bytes(piece)
                piece = bytearray()
    if piece:
        yield bytes(piece)


def _post(store: Any, key: str, tensors: Sequence[torch.Tensor], members: int) -> None:
    """Put the tensors in the store under ``key/net/<n>``, then say so at ``key``."""
    count = 0
    for count, piece in enumerate(_pieces(tensors), 1):
        store.set(f"{key}/net/{count - 1}", piece)
    store.set(key, pickle.dumps((None, members, count)))


def _fetch(store: Any, key: str, count: int, metas: Sequence[Meta]) -> list[torch.Tensor]:
    """A node's other rank: its own copy of the tensors :func:`_post` put."""
    buffers = [wire.receive_buffer(shape, dtype, _CPU) for shape, dtype, *_ in metas]
    views = [_bytes(b) for b in buffers if b.numel()]
    for n in range(count):
        piece = memoryview(store.get(f"{key}/net/{n}"))
        while piece:
            take = min(len(piece), len(views[0]))
            views[0][:take] = piece[:take]
            piece, views[0] = piece[take:], views[0][take:]
            if not views[0]:
                views.pop(0)
    if views:
        raise EOFError(f"{count} pieces under {key}/net hold less than the result")
    return buffers


def _fail(exchange: Any, key: str, members: Sequence[int], exc: BaseException) -> None:
    """Tell the node's other ranks that its main cannot hand the result on."""
    if members:
        try:
            exchange.local_store().set(key, _FAILED + f"{type(exc).__name__}: {exc}".encode())
        except Exception:
            pass  # they give up at their timeout


def _take(
    exchange: Any,
    key: str,
    main: int,
    metas: Sequence[Meta],
    mode: str,
    point: SyncPoint,
    deadline: Deadline,
) -> list[torch.Tensor]:
    """A node's other rank: wait for its main's file, then map it (SHARE) or
    copy it out; the last rank of the node to do so unlinks it."""
    offsets, size = _layout(metas)
    if size == 0:
        return [torch.empty(shape, dtype=dtype) for shape, dtype, *_ in metas]
    store = exchange.local_store()
    try:
        value = bytes(wait_on(store, deadline, lambda: store.get(key)))  # get waits for its key
    except Late:
        raise SyncTimeoutError(
            missing=(main,),
            point=point.describe() + " [waiting for the result in shared memory]",
            timeout=deadline.timeout or 0.0,
            observer=exchange.rank,
        ) from None
    if value.startswith(_FAILED):
        raise SyncError(
            f"rank {exchange.rank} at {point.describe()}: rank {main}, the main rank of "
            f"its node, could not hand on the result of @on_main_only(broadcast=True) "
            f"through shared memory: {value[1:].decode(errors='replace')}. Rank {main}'s "
            f"error says more."
        )
    path, members, *count = pickle.loads(value)
    try:
        if path is None:  # no room in its shared memory: through the store
            tensors = _fetch(store, key, count[0], metas)
        elif mode == SHARE:
            tensors = _views(path, metas)
        else:
            tensors = []
            fd = os.open(path, os.O_RDONLY)
            try:
                for (shape, dtype, *_), offset in zip(metas, offsets, strict=True):
                    buffer = wire.receive_buffer(shape, dtype, _CPU)
                    data, at = _bytes(buffer), offset
                    while data:
                        done = os.preadv(fd, [data], at)
                        if done <= 0:
                            raise EOFError(f"{path} ends at {at}, before {size}")
                        data, at = data[done:], at + done
                    tensors.append(buffer)
            finally:
                os.close(fd)
    except FileNotFoundError as exc:
        raise SyncError(
            f"rank {exchange.rank} at {point.describe()}: the file in which rank {main}, the "
            f"main rank of its node, left the result of {_options(mode)} is gone ({path}): "
            f"rank {main}'s process ended before every rank of its node had the result, "
            f"and a later sweep removed the file."
        ) from exc
    finally:
        # Mapped or copied (or failed): the last rank of the node unlinks.
        if store.add(key + "/taken", 1) == members:
            if path is None:
                for n in range(count[0]):
                    store.delete_key(f"{key}/net/{n}")
            else:
                shm.unlink(path)
            store.delete_key(key)
            store.delete_key(key + "/taken")
    return tensors
