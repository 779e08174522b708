"""The exchange: one rank's side of every sync point, over a c10d store.

An :class:`Exchange` is given everything it works with as values: a store
connection, this rank, the world size and where this rank lives
(:class:`Place`).  It never reads torch's process-global state, so N ranks
can run as threads of one process against a real store (``benchmarks/
scale.py`` does).  Tensor results are the one thing that needs the process
group: ``broadcast`` is handed in, and, where the group is still to be
made, ``on_met`` (called on every rank after a world sync point where all
is well, before any tensor moves) and ``wire_device``.

At each sync point the members of the scope (the world, or this node with
``local=True``) send the scope's main a frame; the main judges them
(``protocol.judge``) and answers every member with one verdict.  Sequence
numbers, per scope, keep the ranks in step.

A rank whose process ends writes its exit where the others already wait:
a member, its frame for the next sync point of each scope; a main, the
verdict of that sync point.  A main then remembers the gone member, and a
member its gone main, for every later sync point.  Nobody polls.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from datetime import timedelta
from typing import Any, Final, cast, final

import torch
import torch.distributed as dist

from .._backend import Failure, SyncPoint
from .._errors import SyncError, SyncTimeoutError, whereabouts
from . import pernode, protocol, wire
from .protocol import OK, TIMEOUT, Frame, Verdict
from .share import unshare
from .stacks import fetch_stacks
from .transport import FOREVER_CHUNK, MIN_WAIT, Keys, Late, Transport
from .watch import Wait, start_watcher

__all__ = ["PREFIX", "Exchange", "Place"]

PREFIX: Final = "syncdeco"
GRACE: Final = 1.0  # extra seconds a member waits for the main's verdict
WITHDRAW_MARGIN: Final = 1.0  # seconds before a member's deadline to look for its withdrawal
STACK_WAIT: Final = 1.0  # seconds a timed-out sync point waits for the missing ranks' stacks
_HIGHEST: Final = pickle.HIGHEST_PROTOCOL

_log = logging.getLogger("syncdeco")

Broadcast = Callable[[torch.Tensor, int], object]


@final
@dataclass(frozen=True, slots=True)
class Place:
    """Where a rank lives: its node's key, its rank on the node, and how many
    ranks the node has (None: the launcher does not say)."""

    node: str
    local_rank: int
    local_size: int | None


def _where(rank: int, seen: str | None, place: tuple[str, str] | None) -> str:
    """A missing rank for a log line: where it was last seen and where it is."""
    if place is None:
        return whereabouts(rank, seen)
    return f"{whereabouts(rank, seen)}, which {place[0]}; its stack:\n{place[1]}"


def _dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=_HIGHEST)


def _off_wire(tensors: list[torch.Tensor], plan: pernode.Plan) -> list[torch.Tensor]:
    return [wire.off_wire(t, meta) for t, meta in zip(tensors, plan[1], strict=True)]


@final
class Exchange:
    """One rank's side of the sync points of one job (a process group, or
    the store that will carry one)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        place: Place,
        *,
        spare: Any = None,
        broadcast: Broadcast | None = None,
        transport: Callable[[Any], Transport] = Keys,
        prefix: str = PREFIX,
        on_met: Callable[[], None] | None = None,
        wire_device: Callable[[], torch.device] = wire.wire_device,
    ) -> None:
        """``store``: a connection of this exchange's own; ``spare``:
        another one, used from other threads (an exit notice while a sync
        point waits on ``store``)."""
        self.store = store
        self.spare = spare
        self.rank = rank
        self.world_size = world_size
        self.place = place
        self.prefix = prefix
        self.mail: Transport = transport(store)
        self.broadcast = broadcast or dist.broadcast
        # Before a process group exists: what makes it, once every rank has
        # met (cleared once it is made), and where its tensors will travel.
        self.on_met = on_met
        self.wire_device = wire_device
        self.lock = threading.Lock()
        self.seq: dict[str, int] = {"w": 0, "l": 0}  # the last sync point entered, per scope
        self.node: tuple[int, tuple[int, ...]] | None = None  # (local main, its members)
        self.gone: dict[int, Failure] = {}  # ranks this one knows have exited
        self.seen: dict[int, tuple[str, float]] = {}  # rank -> (sync point, wall time)
        self.waiting: Wait | None = None  # read by the watcher thread
        self.left = False  # this process has said it is exiting
        self.met = 0  # sync points that succeeded
        self.watcher: threading.Thread | None = None
        # Where this rank lives, for local=True: per node (so a local sync
        # waits only for its own node) and, when the launcher does not say
        # how many ranks share a node, for the whole world.  Sets have no
        # reply: they cost the store one receive each.
        store.set(f"{prefix}/node/{place.node}/{place.local_rank}", str(rank))
        if place.local_size is None:
            store.set(f"{prefix}/topo/{rank}", _dumps((place.node, place.local_rank)))

    # -- who meets whom -------------------------------------------------------

    def scope(
        self, local: bool, deadline: float | None, point: SyncPoint
    ) -> tuple[str, int, tuple[int, ...]]:
        """(scope name, main rank, member ranks) of the world or this node.

        A member of a node needs only its main's rank; the node's main needs
        its members' ranks."""
        if not local or self.world_size == 1:
            return "w", 0, tuple(range(1, self.world_size))
        if self.node is None:
            self.node = self._find_node(deadline, point)
        main, members = self.node
        return "l", main, members

    def _find_node(self, deadline: float | None, point: SyncPoint) -> tuple[int, tuple[int, ...]]:
        prefix, place = self.prefix, self.place
        if place.local_rank != 0:
            key = f"{prefix}/node/{place.node}/0"
            guess = self.rank - place.local_rank  # torchrun numbers a node's ranks in a row
            self._wait_keys([key], [guess], deadline, point)
            return int(self.store.get(key)), ()
        if place.local_size is not None:
            local_ranks = range(1, place.local_size)
            keys = [f"{prefix}/node/{place.node}/{lr}" for lr in local_ranks]
            self._wait_keys(keys, [self.rank + lr for lr in local_ranks], deadline, point)
            return self.rank, tuple(int(v) for v in self.store.multi_get(keys)) if keys else ()
        keys = [f"{prefix}/topo/{r}" for r in range(self.world_size)]
        self._wait_keys(keys, list(range(self.world_size)), deadline, point)
        facts = [pickle.loads(v) for v in self.store.multi_get(keys)]
        node = sorted((lr, r) for r, (key, lr) in enumerate(facts) if key == place.node)
        return self.rank, tuple(r for _, r in node if r != self.rank)

    def _wait_keys(
        self, keys: list[str], ranks: list[int], deadline: float | None, point: SyncPoint
    ) -> None:
        while True:
            left = FOREVER_CHUNK if deadline is None else deadline - time.monotonic()
            try:
                if keys:
                    self.store.wait(keys, timedelta(seconds=max(left, MIN_WAIT)))
                return
            except dist.DistStoreError:
                if deadline is not None and time.monotonic() >= deadline:
                    missing = [
                        r for r, k in zip(ranks, keys, strict=True) if not self.store.check([k])
                    ]
                    raise SyncTimeoutError(
                        missing=missing,
                        point=point.describe() + " [finding this node's ranks]",
                        timeout=0.0 if deadline is None else left,
                        observer=self.rank,
                    ) from None

    def _base(self, scope: str, main: int) -> str:
        return f"{self.prefix}/{scope}/{main}"

    # -- a sync point ---------------------------------------------------------

    def sync(
        self,
        point: SyncPoint,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.left:
            raise SyncError(
                f"rank {self.rank} at {point.describe()}: this process has already told "
                f"the other ranks it is exiting (syncdeco does so at interpreter exit, "
                f"after the atexit handlers registered after `import syncdeco`), so they "
                f"will not meet it here. Reach sync points before the program ends: not "
                f"from a daemon thread still running at exit, nor from an atexit handler "
                f"registered before `import syncdeco`."
            )
        with self.lock:
            # The sequence number moves first, so that a rank whose topology
            # lookup times out stays in step with the others.
            name = "l" if local and self.world_size > 1 else "w"
            seq = self.seq[name] = self.seq[name] + 1
            try:
                name, main, members = self.scope(local, deadline, point)
                if main == self.rank and not members:
                    if name == "w":
                        self._met()  # a world of one
                    return payload  # alone in its scope (members know only their main)
                if self.watcher is None:
                    self.watcher = start_watcher(self)
                base = self._base(name, main)
                if self.rank == main:
                    return self._lead(
                        base, seq, members, point, failure, payload, deadline, timeout
                    )
                if deadline is not None and timeout is not None:
                    # A member waits a little longer than the main rank (and
                    # the second the main takes to ask the missing ranks where
                    # they are), so that when another rank is missing it hears
                    # so from the main, which knows who, instead of blaming it.
                    deadline += min(max(GRACE, 0.1 * timeout), 10 * GRACE) + STACK_WAIT
                return self._follow(base, seq, main, point, failure, deadline, timeout)
            except dist.DistNetworkError as exc:
                raise SyncError(
                    f"rank {self.rank} at {point.describe()} lost its connection to the "
                    f"process group's store ({exc}): the store's host (rank 0, or the "
                    f"launcher's agent) has exited or cannot be reached. Rank 0's log "
                    f"says why."
                ) from exc
            finally:
                self.waiting = None

    def _lead(
        self,
        base: str,
        seq: int,
        members: Sequence[int],
        point: SyncPoint,
        failure: Failure | None,
        payload: object,
        deadline: float | None,
        timeout: float | None,
    ) -> object:
        arrived: dict[int, Frame] = {}
        gone = [m for m in members if m in self.gone]
        missing: list[int] = []
        if gone:
            # A member that is gone never comes: answer at once.
            arrived = {m: protocol.exit_frame(seq, self.gone[m]) for m in gone}
        else:
            self.waiting = Wait(
                time.monotonic(), point.describe(), True, self.rank, members, base, seq
            )
            frames, missing = self.mail.collect(base, seq, members, deadline)
            now = time.time()
            for member, sent in frames.items():
                frame = arrived[member] = Frame(*pickle.loads(sent))
                if frame.kind == "exit":
                    self.gone[member] = Failure(*frame.failure)  # type: ignore[misc]
                elif frame.kind != "absent":
                    self.seen[member] = (frame.where, now)
        stacks = self.stacks(missing) if missing and not self.gone.keys() & arrived.keys() else None
        verdict = protocol.judge(
            seq, point, self.rank, failure, arrived, missing, self.last_seen(missing), stacks
        )
        own_error: BaseException | None = None
        wires: list[torch.Tensor] = []
        world = base == self._base("w", 0)
        if verdict is None:
            try:
                # Tensors travel apart from the pickle (``pernode``); they
                # are made ready before any member is told they follow, so a
                # failure here is an ordinary one.
                data: bytes | None = None
                plan: pernode.Plan = (pernode.BCAST, [])
                if payload is not None:
                    data, plan, wires = pernode.prepare(self, payload, world, point)
                verdict = (seq, OK, data, plan)
            except Exception as exc:
                own_error = exc
                verdict = protocol.failed(seq, [(Failure.from_exception(self.rank, exc), None)])
        if verdict[1] != TIMEOUT and self._withdrawn(base, seq, arrived):
            verdict, wires, own_error = (seq, TIMEOUT, (self.rank,), None), [], None  # too late

        self.mail.answer(base, seq, members, _dumps(verdict))
        if seq > 1 and not gone and not missing:
            self.mail.drop_verdict(base, seq - 1)
        if own_error is not None:
            raise own_error
        if verdict[1] == OK:
            self.met += 1
            if world:
                self._met()  # the group exists before any tensor moves
            plan = cast(pernode.Plan, verdict[3])
            shared = pernode.send(self, seq, plan, wires, members, world, point)
            if shared is None:
                return unshare(payload)
            return wire.loads(cast(bytes, verdict[2]), _off_wire(shared, plan))
        protocol.raise_for(verdict, point, self.rank, timeout)
        return None

    def _follow(
        self,
        base: str,
        seq: int,
        main: int,
        point: SyncPoint,
        failure: Failure | None,
        deadline: float | None,
        timeout: float | None,
    ) -> object:
        if main in self.gone:
            verdict: Verdict = protocol.failed(seq, [(self.gone[main], None)])
            protocol.raise_for(verdict, point, self.rank, timeout)
        give_up = None if deadline is None else time.time() + (deadline - time.monotonic())
        frame = Frame.of(seq, self.rank, point, failure, give_up)
        self.mail.send(base, seq, self.rank, _dumps(tuple(frame)))
        self.waiting = Wait(time.monotonic(), point.describe(), False, main, (), base, seq)
        try:
            verdict = pickle.loads(self.mail.receive(base, seq, self.rank, deadline))
        except Late:
            verdict = self._give_up(base, seq, main, point, timeout)
        self.mail.drop_frame(base, seq, self.rank)
        self.seen[main] = (point.describe(), time.time())
        gone = protocol.gone_in(verdict)
        if gone == main:
            self.gone[main] = Failure(*cast(tuple[int, str, str, str, bool, bool], verdict[2]))
        if verdict[1] == OK:
            self.met += 1
            world = base == self._base("w", 0)
            if world:
                self._met()
            return self._result(verdict, main, point, seq, world, timeout)
        protocol.raise_for(verdict, point, self.rank, timeout)
        return None

    def _give_up(
        self, base: str, seq: int, main: int, point: SyncPoint, timeout: float | None
    ) -> Verdict:
        """Out of time: give up, unless the verdict has just come or the
        main rank has already committed to answering (then it is on its
        way, and the ranks must agree on it)."""
        if self.mail.has_verdict(base, seq, self.rank) or (
            self._claim(base, seq, self.rank, b"withdrawn") == b"answered"
        ):
            return cast(Verdict, pickle.loads(self.mail.receive(base, seq, self.rank, None)))
        # Its frame stays: a main that comes late reads it, and its withdrawal.
        (place, stack) = self.stacks([main])[main]
        raise SyncTimeoutError(
            missing=(main,),
            point=point.describe(),
            timeout=timeout or 0.0,
            observer=self.rank,
            last_seen=self.last_seen([main]),
            stacks={main: stack},
            places={main: place},
        )

    def _result(
        self,
        verdict: Verdict,
        main: int,
        point: SyncPoint,
        seq: int,
        world: bool,
        timeout: float | None,
    ) -> object:
        data = cast("bytes | None", verdict[2])
        plan = cast(pernode.Plan, verdict[3])
        tensors = _off_wire(pernode.receive(self, seq, plan, main, world, point, timeout), plan)
        if data is None:
            return None
        try:
            return wire.loads(data, tensors)
        except Exception as exc:
            raise SyncError(
                f"rank {self.rank} could not unpickle the result rank {main} "
                f"broadcast at {point.describe()}: {exc!r}. Make sure its type "
                f"can be imported on every rank."
            ) from exc

    def _met(self) -> None:
        """Every rank of the world has met at a sync point where all is well:
        make the process group if it is still to be made."""
        on_met = self.on_met
        if on_met is not None:
            on_met()

    # -- a member that gives up, and a main that answers anyway -------------------

    def _claim(self, base: str, seq: int, member: int, claim: bytes) -> bytes:
        """Settle, once and for all, whether ``member`` waits for this sync
        point's verdict (the main claims b"answered") or gave up on it (the
        member claims b"withdrawn"); returns whichever claim came first."""
        return bytes(self.store.compare_set(f"{base}/claim/{seq}/{member}", "", claim))

    def _withdrawn(self, base: str, seq: int, arrived: Mapping[int, Frame]) -> bool:
        """Whether a member gave up waiting before this rank could answer.

        Only members whose own deadline is near (by the wall clock, with a
        margin for clocks that differ between hosts) are asked, so a sync
        point that completes in time costs nothing extra."""
        now = time.time()
        withdrawn = False
        for member, frame in arrived.items():
            if frame.give_up is not None and now >= frame.give_up - WITHDRAW_MARGIN:
                withdrawn |= self._claim(base, seq, member, b"answered") == b"withdrawn"
        return withdrawn

    # -- where the others are ----------------------------------------------------

    def last_seen(self, ranks: Sequence[int]) -> dict[int, str | None]:
        """The last sync point this rank saw each of ``ranks`` at (a frame
        from it, or a verdict), with how long ago."""
        now = time.time()
        seen: dict[int, str | None] = {}
        for rank in ranks:
            where = self.seen.get(rank)
            seen[rank] = (
                None if where is None else f"{where[0]}, {max(0.0, now - where[1]):.0f}s ago"
            )
        return seen

    def stacks(self, ranks: Sequence[int], store: Any = None) -> dict[int, tuple[str, str]]:
        """Where each of ``ranks`` is now, (place, stack or why it could not
        say), fetched from those ranks themselves within about a second."""
        reports = fetch_stacks(
            self.store if store is None else store,
            f"{self.prefix}/stack",
            ranks,
            timeout=STACK_WAIT,
        )
        return {
            r: (report.where(), report.stack or str(report.reason)) for r, report in reports.items()
        }

    def warn(self, wait: Wait, waited: float) -> None:
        """Log who this rank has been waiting for (the watcher calls it)."""
        if wait.lead:
            # Through the spare connection: the waiting thread holds the
            # exchange's own for its whole wait.
            here = (
                set()
                if self.spare is None
                else set(
                    type(self.mail)(self.spare).arrived(wait.base, wait.seq, wait.members)  # type: ignore[call-arg]
                )
            )
            missing = [r for r in wait.members if r not in here]
            seen = self.last_seen(missing)
            places = {} if self.spare is None else self.stacks(missing, self.spare)
            _log.warning(
                "rank %d has waited %.0fs at %s: arrived %s; missing %s",
                self.rank,
                waited,
                wait.point,
                ", ".join(map(str, sorted(here))) or "none",
                "; ".join(_where(r, seen[r], places.get(r)) for r in missing) or "none",
                extra={"rank": self.rank},
            )
        else:
            seen = self.last_seen([wait.main])
            places = {} if self.spare is None else self.stacks([wait.main], self.spare)
            _log.warning(
                "rank %d has waited %.0fs at %s for the main rank %s",
                self.rank,
                waited,
                wait.point,
                _where(wait.main, seen[wait.main], places.get(wait.main)),
                extra={"rank": self.rank},
            )

    # -- exits -----------------------------------------------------------------

    def leave(self, failure: Failure) -> None:
        """This rank's process is ending: tell the ranks that will wait for
        it, with ``failure``, at the next sync point of each scope.  Store
        sets only: they have no reply, so they neither block on a store
        that has gone nor make its client log a broken connection."""
        self.left = True
        if self.lock.acquire(blocking=False):
            try:
                self._say_exit(failure, self.store, self.seq, first_hand=True)
            finally:
                self.lock.release()
        elif self.spare is not None:
            # A thread is inside a sync point, blocked on this exchange's
            # connection (the store client holds it for the whole wait).
            self._say_exit(failure, self.spare, self.seq, first_hand=True)

    def report_killed(self, failure: Failure, store: Any) -> bool:
        """Report the exit of a rank on this node whose process ended
        without saying so itself; False if it had (or another rank reported
        it first).  The ranks are in step, so the next sync point that rank
        would have joined is this rank's current one or the one after."""
        return self._say_exit(failure, store, self.seq, first_hand=False)

    def _say_exit(
        self, failure: Failure, store: Any, seqs: Mapping[str, int], *, first_hand: bool
    ) -> bool:
        """Write ``failure`` (an exit) where the ranks that wait for its rank
        look: its frame (or, for a main, the verdict) at the next sync point
        of each scope, and stand-ins for the other members' frames, so that
        a main waiting for every frame (a slow member among them) wakes at
        once.  First hand, in one request with no reply.  Second hand, at
        this rank's current sync point and the next, never replacing what
        is there, and only if nobody did it before: a compare-and-set on
        one key per rank settles that."""
        gone = _dumps(astuple(failure))
        key = f"{self.prefix}/gone/{failure.rank}"
        if not first_hand and bytes(store.compare_set(key, "", gone)) != gone:
            return False
        mail = type(self.mail)(store)  # type: ignore[call-arg]
        scopes = [("w", 0, range(1, self.world_size))]
        node = self._node_main(store)
        if node is not None:
            scopes.append(("l", node, range(0)))  # a member does not know the others
        frames: list[tuple[str, int, int, bytes]] = []
        verdicts: list[tuple[str, int, bytes]] = []
        for scope, main, members in scopes:
            base = self._base(scope, main)
            seq = seqs[scope]
            for at in (seq + 1,) if first_hand else range(max(seq, 1), seq + 2):
                if failure.rank == main:
                    verdicts.append((base, at, _dumps(protocol.failed(at, [(failure, None)]))))
                    continue
                frame = _dumps(tuple(protocol.exit_frame(at, failure)))
                if not first_hand and not mail.offer_frame(base, at, failure.rank, frame):
                    continue  # it did reach that sync point itself
                frames.append((base, at, failure.rank, frame))
                frames += [
                    (base, at, m, _dumps(tuple(protocol.stand_in(at, m, failure.rank))))
                    for m in members
                    if m != failure.rank
                ]
        if first_hand:
            mail.post(frames, verdicts, [(key, gone)])
            return True
        for base, at, verdict in verdicts:
            mail.offer_verdict(base, at, -1, verdict)
        for base, at, rank, frame in frames:
            if rank != failure.rank:
                mail.offer_frame(base, at, rank, frame)
        return True

    def _node_main(self, store: Any) -> int | None:
        """The rank of this node's main, if this rank knows it (a rank that
        never met its node at a sync point does not)."""
        if self.node is not None:
            return self.node[0]
        return self.rank if self.place.local_rank == 0 else None
