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

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, cast, final

import torch
import torch.distributed as dist

from .._backend import Failure, SyncPoint
from .._errors import RankLostError, SyncError, SyncTimeoutError
from . import pernode, protocol, wire
from .exits import say_exit, waiters_elsewhere
from .keepalive import endpoint, silent
from .protocol import OK, TIMEOUT, Frame, Verdict
from .share import unshare
from .stacks import fetch_stacks
from .tier import (
    POLL,
    Tier,
    announce,
    host_store,
    join_store,
    node_frame,
    raise_tier,
    read_frame,
    uses_tiers,
)
from .transport import FOREVER_CHUNK, MIN_WAIT, Keys, Late, StoreLost, Transport
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


def _dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=_HIGHEST)


def _member_deadline(deadline: float | None, timeout: float | None, tiers: int) -> float | None:
    """A member waits a little longer than its main (and the second the main
    takes to ask the missing ranks where they are), once for each tier
    above it, so that when another rank is missing it hears so from the
    main, which knows who, instead of blaming the rank it waits for."""
    if deadline is None or timeout is None:
        return deadline
    return deadline + tiers * (min(max(GRACE, 0.1 * timeout), 10 * GRACE) + STACK_WAIT)


def _silent(exc: BaseException, store: Any) -> bool:
    """Whether a connection to the job's store failed because its host went
    silent (the kernel gave up on it: see keepalive.py), rather than because
    the store's process ended on a host that is still up."""
    if "timed out" in str(exc).lower():
        return True
    at = endpoint(store)
    return at is not None and silent(*at)


def _relaying(nmail: Transport, nbase: str) -> tuple[int, float | None] | None:
    """The world sync point a node's main waits at on the job's store, and
    until when (wall clock; None: forever), as it told its node."""
    store = cast(Any, nmail).store
    key = f"{nbase}/relaying"
    if not store.check([key]):
        return None
    seq, until = bytes(store.get(key)).decode().split(" ")
    return int(seq), None if until == "-" else float(until)


def _say_relaying(nmail: Transport, nbase: str, seq: int, until: float | None) -> None:
    """A node's main tells its node it waits on the job's store (one key,
    on the node's store), so that the node's sentinel need not look."""
    store = cast(Any, nmail).store
    store.set(f"{nbase}/relaying", f"{seq} {'-' if until is None else repr(until)}")


def _wall(deadline: float | None) -> float | None:
    """A monotonic deadline as wall-clock time (frames cross hosts)."""
    return None if deadline is None else time.time() + (deadline - time.monotonic())


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
        tiers: bool = True,
        host_node: Callable[[], tuple[Any, int]] = host_store,
        join_node: Callable[[int], Any] = join_store,
        overdue: Callable[[int], tuple[int, ...]] = lambda rank: (),
    ) -> None:
        """``store``: a connection of this exchange's own; ``spare``:
        another one, used from other threads (an exit notice while a sync
        point waits on ``store``).  ``tiers``: sync through a store per node
        where the job has several nodes of several ranks (``tier``), each
        hosted by ``host_node()`` (the store, its port) on the node's main
        and reached by ``join_node(port)`` from the node's other ranks.
        ``overdue(rank)``: the ranks of ``rank``'s node when its lease is
        overdue (see nodewatch.py), for a timeout's message."""
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
        # The sync point this rank is in, and the last it left, with when
        # (monotonic): read by the stack responder (`python -m syncdeco where`).
        self.at: tuple[SyncPoint, float] | None = None
        self.passed: tuple[SyncPoint, float] | None = None
        self.left = False  # this process has said it is exiting
        self.met = 0  # sync points that succeeded
        self.watcher: threading.Thread | None = None
        self.stale: dict[str, tuple[Transport, int]] = {}  # verdicts to delete, per scope
        # The node tier (see tier.py): whether this job uses one, the node
        # store this rank hosts (a node's main), and this rank's node once
        # the tier is up (from the world sync point after the first that
        # succeeds: by then every rank has said where it lives).
        self.tiers = tiers and uses_tiers(world_size, place.local_size)
        self.host_node, self.join_node = host_node, join_node
        self.overdue = overdue
        self.hosted: Any = None
        self.announced = False
        self.tier: Tier | None = None
        self.node_mail: Transport | None = None
        self.world_met = False
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
            if self.tier is not None:
                return "w", 0, self.tier.slots  # rank 0's node, and the other nodes' mains
            return "w", 0, tuple(range(1, self.world_size))
        if self.node is None:
            if self.tier is not None:
                tier = self.tier
                self.node = (tier.main, tier.members if tier.main == self.rank else ())
            else:
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

    def local_store(self) -> Any:
        """The store for this node's own traffic: the node's, once the tier
        is up, else the job's."""
        tier = self.tier
        return tier.store if tier is not None and tier.store is not None else self.store

    def base(self, scope: str, main: int) -> str:
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
            self.at = (point, time.monotonic())
            try:
                if self.tiers and not self.announced:
                    announce(self)  # before this rank's first frame
                if name == "w" and self.tiers and self.world_met and self.tier is None:
                    self.tier = raise_tier(self, point)
                if name == "w" and self.tier is not None and self.rank != 0:
                    if self.watcher is None:
                        self.watcher = start_watcher(self)
                    if self.rank == self.tier.main:
                        try:
                            return self._relay(self.tier, seq, point, failure, deadline, timeout)
                        except dist.DistNetworkError as exc:
                            if _silent(exc, self.store):  # its node waits for the relay
                                self._relay_store_lost(self.tier, seq)
                            raise
                    if not self.tier.direct():
                        return self._follow_node(self.tier, seq, point, failure, deadline, timeout)
                name, main, members = self.scope(local, deadline, point)
                if main == self.rank and not members:
                    if name == "w":
                        self._met()  # a world of one
                    return payload  # alone in its scope (members know only their main)
                if self.watcher is None:
                    self.watcher = start_watcher(self)
                base = self.base(name, main)
                # A local sync point travels over the node's store once it is up.
                mail = self.node_mail if name == "l" and self.node_mail is not None else self.mail
                if self.rank == main:
                    return self._lead(
                        base, seq, members, point, failure, payload, deadline, timeout, mail
                    )
                deadline = _member_deadline(deadline, timeout, 1)
                return self._follow(base, seq, main, point, failure, deadline, timeout, mail)
            except dist.DistNetworkError as exc:
                if _silent(exc, self.store):
                    raise self._store_lost(point) from exc
                raise SyncError(
                    f"rank {self.rank} at {point.describe()} lost its connection to the "
                    f"process group's store ({exc}): the store's host (rank 0, or the "
                    f"launcher's agent) has exited or cannot be reached. Rank 0's log "
                    f"says why."
                ) from exc
            finally:
                self.waiting = None
                self.passed, self.at = (point, time.monotonic()), None

    def _store_lost(self, point: SyncPoint) -> RankLostError:
        """The job's store's host stopped answering (its connection timed
        out: see keepalive.py): the host is lost, and rank 0 with it (it
        hosts the store, or runs beside the agent that does)."""
        lost = self._store_loss()
        return RankLostError(
            rank=0,
            host=lost.lost_host,
            ranks=lost.lost_ranks,
            point=point.describe(),
            observer=self.rank,
            store=True,
        )

    def _store_loss(self) -> Failure:
        """The loss of the store's host, as it travels: with rank 0's node
        (the store's host under SLURM and Open MPI, and where torchrun's
        agent usually hosts it), where the tier knows that node."""
        at = endpoint(self.store)
        host = "?" if at is None else f"{at[0]}:{at[1]}"
        ranks = (0,) if self.tier is None else self.tier.zero
        return Failure(0, protocol.STORE_LOST, "", "", True, True, host, ranks)

    def _relay_store_lost(self, tier: Tier, seq: int) -> None:
        """A node's main lost the job's store: its node hears it (relayed)."""
        nmail = self.node_mail
        if nmail is None:
            return
        verdict = _dumps(protocol.failed(seq, [(self._store_loss(), None)]))
        with contextlib.suppress(Exception):
            nmail.answer(self.base("w", self.rank), seq, tier.members, verdict)

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
        mail: Transport | None = None,
    ) -> object:
        mail = mail or self.mail
        world = base == self.base("w", 0)
        arrived: dict[int, Frame] = {}
        # A rank that is gone never comes: answer at once (the world's main
        # hears of any rank's exit, through its node's main with tiers).
        gone = [r for r in self.gone if r != self.rank and (world or r in members)]
        missing: list[int] = []
        told: dict[int, str | None] = {}  # where nodes' mains last saw their missing
        agreed: list[protocol.Agreed] = []  # with tiers: nodes' ranks that came, in groups
        stale = self.stale.pop(base, None)
        if stale is not None:
            stale[0].drop_verdict(base, stale[1])
        if gone:
            arrived = {m: protocol.exit_frame(seq, self.gone[m]) for m in gone}
        else:
            self.waiting = Wait(
                time.monotonic(), point.describe(), True, self.rank, members, base, seq
            )
            frames, missing = mail.collect(base, seq, members, deadline)
            now = time.time()
            for sent in frames.values():
                # A rank's frame, or with tiers, a node's (its ranks' frames).
                got, absent, seen, groups = read_frame(sent)
                missing += absent
                told.update(seen)
                for frame in got:
                    arrived[frame.rank] = frame
                    self._note(frame, now)
                for group in groups:
                    agreed.append(group)
                    self.seen.update(dict.fromkeys(group.ranks, (group.where, now)))
        stacks = self.stacks(missing) if missing and not self.gone.keys() & arrived.keys() else None
        if stacks is not None and world:
            missing = self._with_nodes(missing, stacks)
        last_seen = self.last_seen(missing)
        last_seen.update((r, where) for r, where in told.items() if where is not None)
        verdict = protocol.judge(
            seq, point, self.rank, failure, arrived, missing, last_seen, stacks, agreed
        )
        own_error: BaseException | None = None
        wires: list[torch.Tensor] = []
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
        if verdict[1] != TIMEOUT and self._withdrawn(base, seq, arrived, agreed):
            verdict, wires, own_error = (seq, TIMEOUT, (self.rank,), None), [], None  # too late

        mail.answer(base, seq, members, _dumps(verdict))
        if seq > 1 and not gone and not missing:
            # Every member has read the previous verdict: it goes at this
            # scope's next sync point, where the round trip hides in the wait
            # (here, it would wait behind every member's read of this one).
            self.stale[base] = (mail, seq - 1)
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

    def _with_nodes(self, missing: list[int], stacks: dict[int, tuple[str, str]]) -> list[int]:
        """``missing``, with the ranks of each node whose main is missing
        and whose lease is overdue (the node is silent: its ranks went with
        it, or will be named lost within seconds); ``stacks`` gets theirs.
        Rare: a timeout's path."""
        out = dict.fromkeys(missing)
        for rank in missing:
            out.update(dict.fromkeys(self.overdue(rank)))
        extra = [r for r in out if r not in stacks]
        if extra:
            stacks.update(self.stacks(extra))
        return list(out)

    def _follow(
        self,
        base: str,
        seq: int,
        main: int,
        point: SyncPoint,
        failure: Failure | None,
        deadline: float | None,
        timeout: float | None,
        mail: Transport | None = None,
    ) -> object:
        mail = mail or self.mail
        if main in self.gone:
            verdict: Verdict = protocol.failed(seq, [(self.gone[main], None)])
            protocol.raise_for(verdict, point, self.rank, timeout)
        frame = Frame.of(seq, self.rank, point, failure, _wall(deadline))
        mail.send(base, seq, self.rank, _dumps(tuple(frame)))
        self.waiting = Wait(time.monotonic(), point.describe(), False, main, (), base, seq)
        try:
            verdict = pickle.loads(mail.receive(base, seq, self.rank, deadline))
        except Late:
            verdict = self._give_up(base, seq, main, point, timeout, mail)
        mail.drop_frame(base, seq, self.rank)
        return self._heard(verdict, main, point, seq, base == self.base("w", 0), timeout)

    def _note(self, frame: Frame, now: float) -> None:
        """Remember what a member's frame says of its rank: that it is gone,
        or where it was seen (a stand-in says neither)."""
        if frame.kind == "exit":
            self.gone[frame.rank] = Failure(*frame.failure)  # type: ignore[misc]
        elif frame.kind != "absent":
            self.seen[frame.rank] = (frame.where, now)

    def _heard(
        self,
        verdict: Verdict,
        main: int,
        point: SyncPoint,
        seq: int,
        world: bool,
        timeout: float | None,
    ) -> object:
        """A member has its verdict from ``main``: remember what it says, and
        return the result or raise."""
        self.seen[main] = (point.describe(), time.time())
        gone = protocol.gone_in(verdict)
        if gone is not None and (gone == main or (self.tier is not None and world)):
            self.gone[gone] = protocol.unpack(cast(tuple[object, ...], verdict[2]))
        if verdict[1] == OK:
            self.met += 1
            if world:
                self._met()
            return self._result(verdict, 0 if world else main, point, seq, world, timeout)
        protocol.raise_for(verdict, point, self.rank, timeout)
        return None

    def _give_up(
        self,
        base: str,
        seq: int,
        main: int,
        point: SyncPoint,
        timeout: float | None,
        mail: Transport | None = None,
    ) -> Verdict:
        """Out of time: give up, unless the verdict has just come or the
        main rank has already committed to answering (then it is on its
        way, and the ranks must agree on it)."""
        mail = mail or self.mail
        if mail.has_verdict(base, seq, self.rank) or (
            self._claim(base, seq, self.rank, b"withdrawn") == b"answered"
        ):
            return cast(Verdict, pickle.loads(mail.receive(base, seq, self.rank, None)))
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
        make the process group if it is still to be made; with tiers, the
        next world sync point goes through the nodes' stores."""
        self.world_met = True
        on_met = self.on_met
        if on_met is not None:
            on_met()

    # -- the node tier (see tier.py) ----------------------------------------------

    def _relay(
        self,
        tier: Tier,
        seq: int,
        point: SyncPoint,
        failure: Failure | None,
        deadline: float | None,
        timeout: float | None,
    ) -> object:
        """A node's main (not rank 0's node) at a world sync point: gather its
        node's frames, send rank 0 one frame for the node, and relay the
        verdict to the node."""
        nmail = self.node_mail  # None: a node of one rank
        nbase, wbase, members = self.base("w", self.rank), self.base("w", 0), tier.members
        mine = _member_deadline(deadline, timeout, 1)
        frames = [Frame.of(seq, self.rank, point, failure, _wall(mine))]
        gone = [m for m in members if m in self.gone]
        missing: list[int] = []
        early: bytes | None = None  # the verdict, when it came before the node did
        if gone:
            frames += [protocol.exit_frame(seq, self.gone[m]) for m in gone]
        elif nmail is not None:
            # Done a little before rank 0's deadline, so that rank 0 hears
            # which of this node's ranks are missing, not that the node is.
            until = (
                None if deadline is None or timeout is None else deadline - min(GRACE, timeout / 4)
            )
            self.waiting = Wait(
                time.monotonic(),
                point.describe(),
                True,
                self.rank,
                members,
                nbase,
                seq,
                type(nmail)(tier.spare),  # type: ignore[call-arg]
            )
            sent, missing, early = self._gather(nmail, nbase, wbase, seq, members, until)
            now = time.time()
            for data in sent.values():
                frame = Frame(*pickle.loads(data))
                frames.append(frame)
                self._note(frame, now)
        if early is None:
            if nmail is not None:
                _say_relaying(nmail, nbase, seq, _wall(mine))  # the sentinel need not look
            self.mail.send(
                wbase, seq, self.rank, node_frame(frames, missing, self.last_seen(missing))
            )
            self.waiting = Wait(time.monotonic(), point.describe(), False, 0, (), wbase, seq)
            try:
                early = self.mail.receive(wbase, seq, self.rank, mine)
            except Late:
                try:
                    early = _dumps(self._give_up(wbase, seq, 0, point, timeout))
                except SyncTimeoutError as exc:
                    # Rank 0 never answered: the node hears the same.
                    stacks = {r: (exc.places.get(r, ""), st) for r, st in exc.stacks.items()}
                    late = (seq, TIMEOUT, (0,), self.last_seen([0]), stacks)
                    if nmail is not None:
                        nmail.answer(nbase, seq, members, _dumps(late))
                    raise
            self.mail.drop_frame(wbase, seq, self.rank)
        if nmail is not None:
            nmail.answer(nbase, seq, members, early)
            if seq > 1 and not gone and not missing:
                nmail.drop_verdict(nbase, seq - 1)
        return self._heard(pickle.loads(early), 0, point, seq, True, timeout)

    def _gather(
        self,
        nmail: Transport,
        nbase: str,
        wbase: str,
        seq: int,
        members: Sequence[int],
        deadline: float | None,
    ) -> tuple[dict[int, bytes], list[int], bytes | None]:
        """A node's main: its ranks' frames, until ``deadline``, looking at
        the job's store every POLL seconds meanwhile: (frames, missing, the
        verdict if it came first, from a failure elsewhere)."""
        frames: dict[int, bytes] = {}
        left = list(members)
        while True:
            now = time.monotonic()
            last = deadline is not None and deadline - now <= POLL
            got, left = nmail.collect(nbase, seq, left, deadline if last else now + POLL)
            frames.update(got)
            if not left or last:
                return frames, left, None
            verdict = self._verdict_on_job_store(wbase, seq)
            if verdict is not None:
                return frames, left, verdict

    def _follow_node(
        self,
        tier: Tier,
        seq: int,
        point: SyncPoint,
        failure: Failure | None,
        deadline: float | None,
        timeout: float | None,
    ) -> object:
        """A rank of a node (not rank 0's) at a world sync point: through its
        node's main; over the job's store if the node's store is gone."""
        main, wbase, nbase = tier.main, self.base("w", 0), self.base("w", tier.main)
        if main in self.gone:
            protocol.raise_for(
                protocol.failed(seq, [(self.gone[main], None)]), point, self.rank, timeout
            )
        mine = _member_deadline(deadline, timeout, 2)
        frame = _dumps(tuple(Frame.of(seq, self.rank, point, failure, _wall(mine))))
        data: bytes | None = None
        nmail = self.node_mail
        if nmail is not None and tier.store is not None:
            self.waiting = Wait(
                time.monotonic(),
                point.describe(),
                False,
                main,
                (),
                nbase,
                seq,
                type(nmail)(tier.spare),  # type: ignore[call-arg]
            )
            try:
                nmail.send(nbase, seq, self.rank, frame)
                data = self._await_relay(nmail, nbase, wbase, seq, mine)
                if data is not None:
                    nmail.drop_frame(nbase, seq, self.rank)
            except (StoreLost, dist.DistNetworkError) as exc:
                _log.debug("rank %d lost its node's store: %r", self.rank, exc)
                tier.store = None  # its node's main is gone: the job's store says so
                self.node_mail = None
        if data is None and tier.store is None:
            # Cut off from its node: rank 0's verdict, on the job's store.
            self.waiting = Wait(time.monotonic(), point.describe(), False, main, (), wbase, seq)
            with contextlib.suppress(Late):
                data = self.mail.receive(wbase, seq, self.rank, mine)
        if data is None:
            data = _dumps(self._give_up(wbase, seq, main, point, timeout))
        return self._heard(pickle.loads(data), main, point, seq, True, timeout)

    def _await_relay(
        self, nmail: Transport, nbase: str, wbase: str, seq: int, deadline: float | None
    ) -> bytes | None:
        """The verdict, relayed by the node's main (None: out of time).  The
        node's first rank after its main also looks at the job's store every
        POLL seconds, and relays a verdict it finds there to the node, until
        the main comes (a look at a store whose host was lost blocks for
        seconds, while the main, waiting there already, hears of the loss
        and relays it)."""
        sentinel = self.place.local_rank == 1
        while True:
            now = time.monotonic()
            last = not sentinel or (deadline is not None and deadline - now <= POLL)
            try:
                return nmail.receive(nbase, seq, self.rank, deadline if last else now + POLL)
            except Late:
                if last:
                    return None
            relaying = _relaying(nmail, nbase)
            if relaying is not None and relaying[0] == seq:
                if relaying[1] is None or time.time() < relaying[1]:
                    continue  # the main waits on the job's store itself, and will relay
            try:
                data = self._verdict_on_job_store(wbase, seq)
            except dist.DistNetworkError as exc:
                if not _silent(exc, self.store):
                    raise
                data = _dumps(protocol.failed(seq, [(self._store_loss(), None)]))
            if data is not None:
                nmail.answer(nbase, seq, (), data)
                return data

    def _verdict_on_job_store(self, wbase: str, seq: int) -> bytes | None:
        """A waiting node's look (every POLL seconds): rank 0's verdict, if
        it came while the node waits (a failure elsewhere)."""
        if self.mail.has_verdict(wbase, seq, self.rank):
            return self.mail.receive(wbase, seq, self.rank, None)
        return None

    # -- a member that gives up, and a main that answers anyway -------------------

    def _claim(self, base: str, seq: int, member: int, claim: bytes) -> bytes:
        """Settle, once and for all, whether ``member`` waits for this sync
        point's verdict (the main claims b"answered") or gave up on it (the
        member claims b"withdrawn"); returns whichever claim came first."""
        return bytes(self.store.compare_set(f"{base}/claim/{seq}/{member}", "", claim))

    def _withdrawn(
        self,
        base: str,
        seq: int,
        arrived: Mapping[int, Frame],
        agreed: Sequence[protocol.Agreed] = (),
    ) -> bool:
        """Whether a member gave up waiting before this rank could answer.

        Only members whose own deadline is near (by the wall clock, with a
        margin for clocks that differ between hosts) are asked, so a sync
        point that completes in time costs nothing extra."""
        near = time.time() + WITHDRAW_MARGIN  # a member that gives up before then is asked
        asked = [m for m, f in arrived.items() if f.give_up is not None and f.give_up <= near]
        for group in agreed:
            if group.first_give_up is not None and group.first_give_up <= near:
                asked += [
                    m
                    for m, give_up in zip(group.ranks, group.give_ups, strict=True)
                    if give_up is not None and give_up <= near
                ]
        withdrawn = False
        for member in asked:
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

    # -- exits -----------------------------------------------------------------

    def leave(self, failure: Failure) -> None:
        """This rank's process is ending: tell the ranks that will wait for
        it, with ``failure``, at the next sync point of each scope.  Store
        sets only: they have no reply, so they neither block on a store
        that has gone nor make its client log a broken connection."""
        self.left = True
        if self.lock.acquire(blocking=False):
            try:
                say_exit(self, failure, self.store, self.seq, first_hand=True)
            finally:
                self.lock.release()
        elif self.spare is not None:
            # A thread is inside a sync point, blocked on this exchange's
            # connection (the store client holds it for the whole wait).
            say_exit(self, failure, self.spare, self.seq, first_hand=True, spare=True)

    def report_killed(
        self, failure: Failure, store: Any, *, elsewhere: Sequence[int] | None = None
    ) -> bool:
        """Report the exit of a rank on this node whose process ended
        without saying so itself; False if it had (or another rank reported
        it first).  The ranks are in step, so the next sync point that rank
        would have joined is this rank's current one or the one after.
        ``elsewhere``: the rank is on another node, whose ranks these are
        (its node was lost, or its pulse saw it end)."""
        where = None if elsewhere is None else waiters_elsewhere(self, failure.rank, elsewhere)
        return say_exit(self, failure, store, self.seq, first_hand=False, where=where)

    def node_main(self) -> int | None:
        """The rank of this node's main, if this rank knows it (a rank that
        never met its node at a sync point does not)."""
        if self.node is not None:
            return self.node[0]
        return self.rank if self.place.local_rank == 0 else None
