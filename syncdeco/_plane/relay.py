"""What a waiting node does on the job's store's side of a world sync point.

With the node tier up (see tier.py), a node's main gathers its node's
frames on the node's store, sends rank 0 one frame for the node, and
relays rank 0's verdict.  While the node waits, a failure elsewhere puts
rank 0's verdict on the job's store before the node has come; so that the
node hears it, two of its ranks look there every ``tier.POLL`` seconds
from their watcher threads (``watch.py``):

* the node's main, while it gathers its ranks' frames: a verdict it finds
  is relayed to the node, and stand-in frames (:func:`wake_frame`) wake
  its gathering thread;
* the node's first other rank (its sentinel), while it waits for the
  relay, unless the node's main says it waits on the job's store itself
  (:func:`say_relaying`): a look at a store whose host was lost blocks for
  seconds, and the main, waiting there, hears of the loss and relays it.

The exchange (exchange.py) calls these; they are given their connections
and keys as values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import torch.distributed as dist

from .._backend import Failure
from . import protocol
from .deadline import NEVER, Deadline
from .frames import Frame, dump_frame, dump_verdict, load_frame
from .keepalive import went_silent
from .transport import Transport

__all__ = ["WAKE", "gather", "looker", "relaying", "say_relaying", "wake_frame"]

WAKE: Final = "wake"  # a frame's kind, put by a look that found the verdict first


def wake_frame(seq: int, rank: int) -> Frame:
    """A frame put in ``rank``'s place by a look that found the verdict on
    the job's store first: it wakes the node's main that waits for frames."""
    return Frame(seq, rank, WAKE, "", 0, None, "(the verdict came first)", None)


def relaying(node: Transport, nbase: str) -> tuple[int, float | None] | None:
    """The world sync point a node's main waits at on the job's store, and
    until when (wall clock; None: forever), as it told its node."""
    store = cast(Any, node).store
    key = f"{nbase}/relaying"
    if not store.check([key]):
        return None
    seq, until = bytes(store.get(key)).decode().split(" ")
    return int(seq), None if until == "-" else float(until)


def say_relaying(node: Transport, nbase: str, seq: int, until: float | None) -> None:
    """A node's main tells its node it waits on the job's store (one key,
    on the node's store), so that the node's sentinel need not look."""
    store = cast(Any, node).store
    store.set(f"{nbase}/relaying", f"{seq} {'-' if until is None else repr(until)}")


def gather(
    nmail: Transport,
    job: Transport,
    nbase: str,
    wbase: str,
    seq: int,
    rank: int,
    members: Sequence[int],
    deadline: Deadline,
) -> tuple[list[Frame], list[int], bytes | None]:
    """A node's main (``rank``): its ranks' frames on the node's store,
    until ``deadline`` (its watcher looks at the job's store meanwhile, and
    wakes this wait where it finds the verdict there): (frames, missing,
    rank 0's verdict if it came first, from a failure elsewhere)."""
    got, missing = nmail.collect(nbase, seq, members, deadline)
    frames = [cast(Frame, load_frame(data)) for data in got.values()]
    woken = [f.rank for f in frames if f.kind == WAKE]
    if not woken:
        return frames, missing, None
    frames = [f for f in frames if f.kind != WAKE]
    early = job.receive(wbase, seq, rank, NEVER) if job.has_verdict(wbase, seq, rank) else None
    return frames, missing + woken, early


def looker(
    job: Transport,
    node: Transport,
    store: Any,
    nbase: str,
    wbase: str,
    seq: int,
    rank: int,
    wake: Sequence[int],
    loss: Callable[[], Failure],
) -> Callable[[], None]:
    """What a waiting node's watcher does every POLL seconds: look at the
    job's store (over ``job``, a connection the sync point does not wait
    on) for rank 0's verdict; relay one it finds to the node (``node``),
    and wake its node's main where it waits for frames (``wake``: the
    members whose frames it waits for; none for the sentinel).  A sentinel
    that finds the job's store's host silent (``store``: the job's store)
    relays ``loss()`` as the verdict."""
    sentinel = not wake

    def look() -> None:
        if sentinel:
            said = relaying(node, nbase)
            if said is not None and said[0] == seq:
                if said[1] is None or time.time() < said[1]:
                    return  # the main waits on the job's store itself, and will relay
        try:
            data = job.peek(wbase, seq, rank)
        except dist.DistNetworkError as exc:
            if not sentinel or not went_silent(exc, store):
                wake_main()  # it looks itself, and hears of the loss
                raise
            data = dump_verdict(protocol.failed(seq, [(loss(), None)]))
        if data is None:
            return
        node.offer_verdict(nbase, seq, -1, data)  # the node's ranks hear it now
        wake_main()

    def wake_main() -> None:
        for m in wake:
            node.offer_frame(nbase, seq, m, dump_frame(wake_frame(seq, m)))

    return look
