"""The exchange: one rank's side of every sync point, over a c10d store.

An :class:`Exchange` is given everything it works with as values: a store
connection, this rank, the world size and where this rank lives
(:class:`Place`).  It never reads torch's process-global state, so N ranks
can run as threads of one process against a real store (``benchmarks/
scale.py`` does).  Tensor results are the one thing that needs the process
group: ``broadcast`` is handed in, and, where the group is still to be
made, ``on_met`` (called on every rank after a world sync point where all
is well, before any tensor moves) and ``wire_device``.

The exchange decides nothing itself: it asks the protocol (``protocol``)
which way this rank takes (:func:`~.protocol.route`), what the frames it
collected say and what the verdict is, and does the I/O: it sends frames
and verdicts (``frames``' codec, over a ``transport``) and waits until a
:class:`~.deadline.Deadline`.  Sequence numbers, per scope, keep the ranks
in step.

A rank whose process ends writes its exit where the others already wait
(``exits``): a member, its frame for the next sync point of each scope; a
main, the verdict of that sync point.  A main then remembers the gone
member, and a member its gone main, for every later sync point.  No rank
polls for an exit: it is written where the others already wait.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, cast, final

import torch
import torch.distributed as dist

from .._backend import Failure, SyncPoint
from .._errors import RankLostError, SyncError, SyncTimeoutError
from . import pernode, protocol, wire
from .deadline import NEVER, STACK_WAIT, WITHDRAW_MARGIN, Deadline, look_until
from .exits import gone_key, say_exit
from .frames import (
    Agreed,
    Failed,
    Frame,
    NodeFrame,
    Ok,
    Timeout,
    Verdict,
    dump_frame,
    dump_verdict,
    load_failure,
    load_frame,
    load_verdict,
)
from .keepalive import endpoint, went_silent
from .protocol import ALONE, FALLBACK, MAIN, NODE_MAIN, Place, Route
from .relay import WAKE, gather, looker, say_relaying
from .share import unshare
from .stacks import fetch_stacks
from .tier import POLL, NodeTier, Tier, host_store, join_store
from .transport import Keys, Late, StoreLost, Transport, wait_on
from .watch import Wait, start_watcher

__all__ = ["PREFIX", "Exchange", "Place"]

PREFIX: Final = "syncdeco"
# Seconds a rank that lost its node's store looks for its node's main's exit
# on the job's store (the node's death watch reports a kill within about one).
NODE_GONE_WAIT: Final = 3.0

_log = logging.getLogger("syncdeco")

Broadcast = Callable[[torch.Tensor, int], object]


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
        point waits on ``store``; a waiting node's look at the job's store).
        ``tiers``: sync through a store per node where the job has several
        nodes of several ranks (``tier``), each hosted by ``host_node()``
        (the store, its port) on the node's main and reached by
        ``join_node(port)`` from the node's other ranks.  ``overdue(rank)``:
        the ranks of ``rank``'s node when its lease is overdue (see
        nodewatch.py), for a timeout's message."""
        self.store = store
        self.spare = spare
        self.rank = rank
        self.world_size = world_size
        self.place = place
        self.prefix = prefix
        self.transport = transport
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
        self.stale: dict[str, tuple[Transport, int]] = {}  # verdicts to delete, per base
        # (seq, member) of this main's claims, per base, to delete (_drop_claims)
        self.claimed: dict[str, list[tuple[int, int]]] = {}
        # This rank's frames to delete, per scope: each goes once its next
        # frame is sent (then, the round trip hides in the wait).
        self.sent: dict[str, tuple[Transport, str, int]] = {}
        self.routes: dict[tuple[object, ...], Route] = {}  # the core's answers, as they hold
        # The node tier (see tier.py), which owns its state; it rises at
        # the world sync point after the first that succeeds (by then every
        # rank has said where it lives).
        self.nodes = NodeTier(
            store,
            rank,
            world_size,
            place,
            prefix,
            enabled=tiers,
            transport=transport,
            host_node=host_node,
            join_node=join_node,
        )
        self.overdue = overdue
        self.world_met = False
        # Where this rank lives, for local=True: per node (so a local sync
        # waits only for its own node) and by rank, for the whole world (where
        # the launcher does not say how many ranks share a node, and to name
        # the ranks that have not started).  Sets have no reply: they cost
        # the store one receive each.
        store.set(f"{prefix}/node/{place.node}/{place.local_rank}", str(rank))
        store.set(f"{prefix}/topo/{rank}", pickle.dumps((place.node, place.local_rank)))

    @property
    def tier(self) -> Tier | None:
        """This rank's node, once the node tier is up."""
        return self.nodes.tier

    @property
    def node_mail(self) -> Transport | None:
        """Frames and verdicts over the node's store, once the tier is up."""
        return self.nodes.mail

    @property
    def hosted(self) -> tuple[Any, int] | None:
        """The node store this rank hosts (a node's main), and its port."""
        return self.nodes.hosted

    # -- who meets whom -------------------------------------------------------

    def route(self, local: bool, deadline: Deadline, point: SyncPoint) -> Route:
        """The protocol's way for this rank at a sync point (this rank's
        node found first, for a local one)."""
        tier = self.tier
        reachable = tier is not None and tier.store is not None
        key = (local, id(tier), reachable, self.node)
        way = self.routes.get(key)
        if way is not None:
            return way
        node = None
        if local and self.world_size > 1:
            if self.node is None:
                if tier is not None:
                    self.node = (tier.main, tier.members if tier.main == self.rank else ())
                else:
                    self.node = self._find_node(deadline, point)
            node = self.node
        way = self.routes[key] = protocol.route(
            self.rank,
            self.world_size,
            local,
            layout=None if tier is None else tier.layout,
            reachable=reachable,
            node=node,
        )
        return way

    def _find_node(self, deadline: Deadline, point: SyncPoint) -> tuple[int, tuple[int, ...]]:
        prefix, place = self.prefix, self.place
        if place.local_rank != 0:
            key = f"{prefix}/node/{place.node}/0"
            self._wait_node([0], deadline, point)
            return int(self.store.get(key)), ()
        if place.local_size is not None:
            local_ranks = list(range(1, place.local_size))
            keys = self._wait_node(local_ranks, deadline, point)
            return self.rank, tuple(int(v) for v in self.store.multi_get(keys)) if keys else ()
        keys = [f"{prefix}/topo/{r}" for r in range(self.world_size)]
        self._wait_keys(keys, lambda absent: (absent, ""), deadline, point)
        facts = [pickle.loads(v) for v in self.store.multi_get(keys)]
        node = sorted((lr, r) for r, (key, lr) in enumerate(facts) if key == place.node)
        return self.rank, tuple(r for _, r in node if r != self.rank)

    def _wait_node(self, local_ranks: list[int], deadline: Deadline, point: SyncPoint) -> list[str]:
        """Wait for these local ranks of this node to say which ranks they
        are (under the keys returned); out of time, name them
        (``protocol.not_started``)."""
        place = self.place

        def started(rank: int) -> bool:
            return bool(self.store.check([f"{self.prefix}/topo/{rank}"]))

        def named(absent: list[int]) -> tuple[list[int], str]:
            local = [local_ranks[i] for i in absent]
            ranks = protocol.not_started(place.ranks, local, started, self.world_size)
            return ranks, f": local rank(s) {', '.join(map(str, local))} of {place.node}"

        keys = [f"{self.prefix}/node/{place.node}/{lr}" for lr in local_ranks]
        self._wait_keys(keys, named, deadline, point)
        return keys

    def _wait_keys(
        self,
        keys: list[str],
        named: Callable[[list[int]], tuple[list[int], str]],
        deadline: Deadline,
        point: SyncPoint,
    ) -> None:
        """Wait for ``keys``; out of time, raise naming the ranks that
        ``named`` gives for those still absent (by index), and what it says
        of them."""
        if not keys:
            return
        try:
            wait_on(self.store, deadline, lambda: self.store.wait(keys))
        except Late:
            absent = [i for i, k in enumerate(keys) if not self.store.check([k])]
            missing, whom = named(absent) if absent else ([], "")
            if not missing or all(self.store.check([keys[i]]) for i in absent):
                return  # (they came as the wait ended)
            raise SyncTimeoutError(
                missing=missing,
                point=f"{point.describe()} [finding this node's ranks{whom}]",
                timeout=deadline.timeout or 0.0,
                observer=self.rank,
                last_seen=dict.fromkeys(missing),
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
        deadline = Deadline.after(timeout)
        with self.lock:
            if self.left:  # (under the lock: leave() may take it meanwhile)
                raise self._after_leaving(point)
            # The sequence number moves first, so that a rank whose topology
            # lookup times out stays in step with the others.
            name = "l" if local and self.world_size > 1 else "w"
            seq = self.seq[name] = self.seq[name] + 1
            self.at = (point, time.monotonic())
            try:
                if self.nodes.due():
                    self.nodes.announce()  # before this rank's first frame
                if name == "w" and self.nodes.ready(self.world_met):
                    self.nodes.rise(point)
                way = self.route(local, deadline, point)
                if way.kind == ALONE:
                    if way.scope == "w":
                        self._met()  # a world of one
                    return payload  # alone in its scope (members know only their main)
                if self.watcher is None:
                    self.watcher = start_watcher(self)
                shortcut = protocol.main_gone(way, self.gone, seq)
                if shortcut is not None:
                    protocol.raise_for(shortcut, point, self.rank, timeout)
                if way.kind == NODE_MAIN:
                    try:
                        return self._relay(way, seq, point, failure, deadline)
                    except (StoreLost, dist.DistNetworkError) as exc:
                        # Its node waits for the relay: it hears what this rank raises.
                        if went_silent(exc, self.store):
                            self._relay_store_lost(way, seq)
                            raise
                        ended = self._store_ended(point, exc)
                        self._relay_failure(way, seq, Failure.from_exception(self.rank, ended))
                        raise ended from exc
                if way.kind in (protocol.NODE_MEMBER, FALLBACK):
                    return self._follow_node(way, seq, point, failure, deadline)
                base = self.base(way.scope, way.main)
                # A local sync point travels over the node's store once it is up.
                node_mail = self.node_mail
                if way.scope == "l" and node_mail is None and self.tier is not None:
                    # Cut off from its node's store: the node's main that hosts it is gone.
                    self._node_store_lost(way.main, seq, point, deadline)
                mail = node_mail if way.scope == "l" and node_mail is not None else self.mail
                try:
                    if way.kind == MAIN:
                        return self._lead(base, seq, way, point, failure, payload, deadline, mail)
                    return self._follow(base, seq, way, point, failure, deadline, mail)
                except (StoreLost, dist.DistNetworkError):
                    if mail is self.mail:
                        raise
                    self._node_store_lost(way.main, seq, point, deadline)
            except (StoreLost, dist.DistNetworkError) as exc:
                if went_silent(exc, self.store):
                    raise self._store_lost(point) from exc
                raise self._store_ended(point, exc) from exc
            finally:
                self.waiting = None
                self.passed, self.at = (point, time.monotonic()), None

    def _after_leaving(self, point: SyncPoint) -> SyncError:
        """A sync point reached after this rank said it is exiting."""
        return SyncError(
            f"rank {self.rank} at {point.describe()}: this process has already told "
            f"the other ranks it is exiting (syncdeco does so at interpreter exit, "
            f"after the atexit handlers registered after `import syncdeco`), so they "
            f"will not meet it here. Reach sync points before the program ends: not "
            f"from a daemon thread still running at exit, nor from an atexit handler "
            f"registered before `import syncdeco`."
        )

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

    def _node_store_lost(
        self, main: int, seq: int, point: SyncPoint, deadline: Deadline
    ) -> NoReturn:
        """A local sync point lost its node's store (now, or at an earlier
        sync point), which the node's main (``main``) hosts: that rank has
        ended.  Raises what the others hear of it: its exit on the job's
        store (its own notice, or the one this node's death watch writes
        within about a second of a killed process), else that it is gone."""
        self.nodes.cut_off()  # from now on the job's store
        key, store, left = gone_key(self.prefix, main), self.store, deadline.left()
        wait = NODE_GONE_WAIT if left is None else min(left, NODE_GONE_WAIT)
        if look_until(lambda: store.check([key]), wait, first=0.005, most=0.1):
            exited = self.gone[main] = load_failure(bytes(store.get(key)))
            protocol.raise_for(protocol.failed(seq, [(exited, None)]), point, self.rank, None)
        raise SyncError(
            f"rank {self.rank} at {point.describe()} lost its connection to its node's "
            f"store, which rank {main} (its node's main) hosts, and found no word of "
            f"rank {main}'s end on the job's store within {NODE_GONE_WAIT:g}s: its "
            f"process has ended, or this rank cannot reach its node's store. Rank "
            f"{main}'s log, and the launcher's, say which."
        )

    def _store_ended(self, point: SyncPoint, exc: BaseException) -> SyncError:
        """The job's store went away on a host that still answers: its
        process ended."""
        return SyncError(
            f"rank {self.rank} at {point.describe()} lost its connection to the "
            f"process group's store ({exc}): the store's host (rank 0, or the "
            f"launcher's agent) has exited or cannot be reached. Rank 0's log "
            f"says why."
        )

    def _relay_store_lost(self, way: Route, seq: int) -> None:
        """A node's main lost the job's store's host: its node hears it (relayed)."""
        self._relay_failure(way, seq, self._store_loss())

    def _relay_failure(self, way: Route, seq: int, failure: Failure) -> None:
        """A node's main cannot reach rank 0's verdict: its node hears
        ``failure`` instead, relayed as the verdict (unless one is there
        already: a look at the job's store may have found rank 0's)."""
        nmail = self.node_mail
        if nmail is None:
            return
        verdict = dump_verdict(protocol.failed(seq, [(failure, None)]))
        with contextlib.suppress(Exception):
            nmail.offer_verdict(self.base("w", self.rank), seq, -1, verdict)

    def _send(self, mail: Transport, base: str, seq: int, frame: Frame | NodeFrame) -> None:
        """Send this rank's frame, then forget its previous one in the same
        scope (read by now: this rank had its verdict)."""
        scope = base[len(self.prefix) + 1]
        mail.send(base, seq, self.rank, dump_frame(frame))
        pending = self.sent.pop(scope, None)
        if pending is None:
            return
        old, old_base, old_seq = pending
        if old is mail:
            old.drop_frame(old_base, old_seq, self.rank)
            return
        try:  # (on a store this rank no longer uses: its node's, gone with its main)
            old.drop_frame(old_base, old_seq, self.rank)
        except Exception as exc:
            _log.debug("rank %d could not drop its frame on %s: %r", self.rank, old_base, exc)

    def _lead(
        self,
        base: str,
        seq: int,
        way: Route,
        point: SyncPoint,
        failure: Failure | None,
        payload: object,
        deadline: Deadline,
        mail: Transport,
    ) -> object:
        world, members = way.scope == "w", way.members
        # A rank that is gone never comes: answer at once (the world's main
        # hears of any rank's exit, through its node's main with tiers).
        gone = protocol.gone_frames(way, self.rank, self.gone, seq)
        missing: list[int] = []
        told: dict[int, str | None] = {}  # where nodes' mains last saw their missing
        agreed: list[Agreed] = []  # with tiers: nodes' ranks that came, in groups
        stale = self.stale.pop(base, None)
        if stale is not None:
            stale[0].drop_verdict(base, stale[1])
        # The verdict if all is well is made before the frames come, so that
        # the members, who wait for it, do not wait for its pickling too.
        ready = self._ready(seq, payload, world, point)
        if gone:
            arrived = gone
        else:
            # A look at who has come goes over a connection of its own: on the
            # node's store for a local sync point there (see watch.warn).
            look = None if mail is self.mail else self.transport(cast(Tier, self.tier).spare)
            self.waiting = Wait(
                time.monotonic(), point.describe(), True, self.rank, members, base, seq, look
            )
            sent, missing = mail.collect(base, seq, members, deadline)
            arrived, absent, told, agreed = protocol.gathered(map(load_frame, sent.values()))
            missing += absent
            self._note(arrived.values(), agreed)
        stacks = self.stacks(missing) if missing and not self.gone.keys() & arrived.keys() else None
        if stacks is not None and world:
            missing = self._with_nodes(missing, stacks)
        last_seen = self.last_seen(missing) if missing else {}
        if told:
            last_seen.update((r, where) for r, where in told.items() if where is not None)
        verdict: Verdict | None = protocol.judge(
            seq, point, self.rank, failure, arrived, missing, last_seen, stacks, agreed
        )
        own_error: BaseException | None = None
        wires: list[torch.Tensor] = []
        encoded = b""  # the verdict as it travels, if made already
        if verdict is None:
            if isinstance(ready, Exception):
                own_error = ready
                verdict = protocol.failed(seq, [(Failure.from_exception(self.rank, ready), None)])
            else:
                verdict, encoded, wires = ready
        if not isinstance(verdict, Timeout):
            asked = protocol.to_ask(arrived, agreed, time.time(), WITHDRAW_MARGIN)
            # Every member asked is claimed, so that none withdraws later.
            claims = [self._claim(base, seq, m, b"answered") for m in asked]
            if asked:  # (deleted once each member has had the verdict: _drop_claims)
                self.claimed.setdefault(base, []).extend((seq, m) for m in asked)
            if b"withdrawn" in claims:  # too late: a member gave up
                verdict, wires, own_error = protocol.withdrawal(verdict, True, self.rank), [], None
                encoded = b""

        if self.left:  # said meanwhile, from another thread: its exit is the verdict
            raise self._after_leaving(point)
        mail.answer(base, seq, members, encoded or dump_verdict(verdict))
        if seq > 1 and not gone and not missing:
            # Every member has read the previous verdict: it goes at this
            # scope's next sync point, where the round trip hides in the wait
            # (here, it would wait behind every member's read of this one).
            self.stale[base] = (mail, seq - 1)
            if self.claimed:
                self._drop_claims(base, seq)
        if own_error is not None:
            raise own_error
        if isinstance(verdict, Ok):
            self.met += 1
            if world:
                self._met()  # the group exists before any tensor moves
            plan = cast(pernode.Plan, verdict.plan)
            shared = pernode.send(self, seq, plan, wires, members, world, point)
            if shared is None:
                return unshare(payload)
            return wire.loads(cast(bytes, verdict.data), _off_wire(shared, plan))
        protocol.raise_for(verdict, point, self.rank, deadline.timeout)
        return None

    def _ready(
        self, seq: int, payload: object, world: bool, point: SyncPoint
    ) -> tuple[Ok, bytes, list[torch.Tensor]] | Exception:
        """The main's verdict at ``seq`` if every rank is well, encoded, and
        the tensors that follow it; or what preparing it raised.  Tensors
        travel apart from the pickle (``pernode``); they are made ready
        before any member is told they follow, so a failure here is an
        ordinary one, which the others hear of."""
        try:
            data: bytes | None = None
            plan: pernode.Plan = (pernode.BCAST, [])
            wires: list[torch.Tensor] = []
            if payload is not None:
                data, plan, wires = pernode.prepare(self, payload, world, point)
        except Exception as exc:
            return exc
        verdict = Ok(seq, data, cast("tuple[str, list[object]]", plan))
        return verdict, dump_verdict(verdict), wires

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
        way: Route,
        point: SyncPoint,
        failure: Failure | None,
        deadline: Deadline,
        mail: Transport,
    ) -> object:
        main, mine, where = way.main, deadline.extended(way.tiers), point.describe()
        frame = Frame(
            seq, self.rank, point.kind, point.name, point.count, failure, where, mine.wall()
        )
        self._send(mail, base, seq, frame)
        self.waiting = Wait(time.monotonic(), where, False, main, (), base, seq)
        try:
            verdict: Verdict | None = load_verdict(mail.receive(base, seq, self.rank, mine))
        except Late:
            verdict = None  # (given up outside the handler: no Late in the user's traceback)
        if verdict is None:
            verdict = self._give_up(base, seq, main, point, deadline, mail)
        self.sent[way.scope] = (mail, base, seq)
        return self._heard(verdict, main, point, seq, way.scope == "w", deadline, where)

    def _note(self, frames: Sequence[Frame] | Any, agreed: Sequence[Agreed] = ()) -> None:
        """Remember what members' frames say of their ranks: that one is
        gone, or where each was seen (a stand-in says neither)."""
        now = time.time()
        for frame in frames:
            exited = protocol.noted(frame)
            if exited is not None:
                self.gone[frame.rank] = exited
            elif frame.kind not in ("absent", WAKE):
                self.seen[frame.rank] = (frame.where, now)
        for group in agreed:
            self.seen.update(dict.fromkeys(group.ranks, (group.where, now)))

    def _heard(
        self,
        verdict: Verdict,
        main: int,
        point: SyncPoint,
        seq: int,
        world: bool,
        deadline: Deadline,
        where: str | None = None,
    ) -> object:
        """A member has its verdict from ``main``: remember what it says, and
        return the result or raise.  ``where``: ``point`` described, if it
        was already."""
        self.seen[main] = (point.describe() if where is None else where, time.time())
        gone = protocol.marks_gone(verdict, main, self.tier is not None and world)
        if gone is not None:
            self.gone[gone] = cast(Failed, verdict).failure
        if isinstance(verdict, Ok):
            self.met += 1
            if world:
                self._met()
            return self._result(verdict, 0 if world else main, point, seq, world, deadline)
        protocol.raise_for(verdict, point, self.rank, deadline.timeout)
        return None

    def _give_up(
        self,
        base: str,
        seq: int,
        main: int,
        point: SyncPoint,
        deadline: Deadline,
        mail: Transport | None = None,
    ) -> Verdict:
        """Out of time: give up, unless the verdict has just come or the
        main rank has already committed to answering (then it is on its
        way, and the ranks must agree on it)."""
        mail = mail or self.mail
        if mail.has_verdict(base, seq, self.rank) or (
            self._claim(base, seq, self.rank, b"withdrawn") == b"answered"
        ):
            return load_verdict(mail.receive(base, seq, self.rank, NEVER))
        # Its frame stays: a main that comes late reads it, and its withdrawal.
        (place, stack) = self.stacks([main])[main]
        raise SyncTimeoutError(
            missing=(main,),
            point=point.describe(),
            timeout=deadline.timeout or 0.0,
            observer=self.rank,
            last_seen=self.last_seen([main]),
            stacks={main: stack},
            places={main: place},
        )

    def _result(
        self,
        verdict: Ok,
        main: int,
        point: SyncPoint,
        seq: int,
        world: bool,
        deadline: Deadline,
    ) -> object:
        plan = cast(pernode.Plan, verdict.plan)
        tensors: list[torch.Tensor] = []
        if plan[1]:  # the result has tensors: they follow the verdict
            got = pernode.receive(self, seq, plan, main, world, point, deadline)
            tensors = _off_wire(got, plan)
        if verdict.data is None:
            return None
        try:
            return wire.loads(verdict.data, tensors)
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
        self, way: Route, seq: int, point: SyncPoint, failure: Failure | None, deadline: Deadline
    ) -> object:
        """A node's main (not rank 0's node) at a world sync point: gather its
        node's frames, send rank 0 one frame for the node, and relay the
        verdict to the node."""
        tier = cast(Tier, self.tier)
        nmail = self.node_mail  # None: a node of one rank
        nbase, wbase, members = self.base("w", self.rank), self.base("w", 0), way.members
        mine = deadline.extended(way.tiers)
        frames = [Frame.of(seq, self.rank, point, failure, mine.wall())]
        gone = protocol.gone_frames(way, self.rank, self.gone, seq)
        missing: list[int] = []
        early: bytes | None = None  # the verdict, when it came before the node did
        if gone:
            frames += gone.values()
        elif nmail is not None:
            node = self.transport(tier.spare)
            self.waiting = Wait(
                time.monotonic(),
                point.describe(),
                True,
                self.rank,
                members,
                nbase,
                seq,
                node,
                self._looker(wbase, nbase, seq, node, members),
                POLL,
            )
            got, missing, early = gather(
                nmail, self.mail, nbase, wbase, seq, self.rank, members, deadline.early()
            )
            frames += got
            self._note(got)
        if early is None:
            if nmail is not None:
                say_relaying(nmail, nbase, seq, mine.wall())  # the sentinel need not look
            seen = self.last_seen(missing)
            self._send(self.mail, wbase, seq, NodeFrame.of(frames, missing, seen))
            self.waiting = Wait(time.monotonic(), point.describe(), False, 0, (), wbase, seq)
            try:
                early = self.mail.receive(wbase, seq, self.rank, mine)
            except Late:
                early = None  # (given up outside the handler, as in _follow)
            if early is None:
                try:
                    early = dump_verdict(self._give_up(wbase, seq, 0, point, deadline))
                except SyncTimeoutError as exc:
                    # Rank 0 never answered: the node hears the same.
                    stacks = {r: (exc.places.get(r, ""), st) for r, st in exc.stacks.items()}
                    late = Timeout(seq, (0,), self.last_seen([0]), stacks)
                    if nmail is not None:
                        nmail.answer(nbase, seq, members, dump_verdict(late))
                    raise
            self.sent["w"] = (self.mail, wbase, seq)
        if nmail is not None:
            if self.left:  # (as in _lead)
                raise self._after_leaving(point)
            nmail.answer(nbase, seq, members, early)
            if seq > 1 and not gone and not missing:
                nmail.drop_verdict(nbase, seq - 1)
        return self._heard(load_verdict(early), 0, point, seq, True, deadline)

    def _looker(
        self, wbase: str, nbase: str, seq: int, node: Transport, wake: Sequence[int]
    ) -> Callable[[], None] | None:
        """The look a waiting node's watcher makes at the job's store (see
        relay.py), over the spare connection."""
        if self.spare is None:
            return None  # (a simulated rank without a second connection)
        job = self.transport(self.spare)
        return looker(job, node, self.store, nbase, wbase, seq, self.rank, wake, self._store_loss)

    def _follow_node(
        self, way: Route, seq: int, point: SyncPoint, failure: Failure | None, deadline: Deadline
    ) -> object:
        """A rank of a node (not rank 0's) at a world sync point: through its
        node's main; over the job's store if the node's store is gone."""
        tier = cast(Tier, self.tier)
        main, wbase, nbase = way.main, self.base("w", 0), self.base("w", way.main)
        mine = deadline.extended(way.tiers)
        data: bytes | None = None
        nmail = self.node_mail
        if way.kind != FALLBACK and nmail is not None:
            node = self.transport(tier.spare)
            sentinel = self.place.local_rank == 1
            self.waiting = Wait(
                time.monotonic(),
                point.describe(),
                False,
                main,
                (),
                nbase,
                seq,
                node,
                self._looker(wbase, nbase, seq, node, ()) if sentinel else None,
                POLL,
            )
            try:
                self._send(nmail, nbase, seq, Frame.of(seq, self.rank, point, failure, mine.wall()))
                with contextlib.suppress(Late):
                    data = nmail.receive(nbase, seq, self.rank, mine)
                if data is not None:
                    self.sent["w"] = (nmail, nbase, seq)
            except (StoreLost, dist.DistNetworkError) as exc:
                _log.debug("rank %d lost its node's store: %r", self.rank, exc)
                self.nodes.cut_off()  # its node's main is gone: the job's store says so
        if data is None and tier.store is None:
            # Cut off from its node: rank 0's verdict, on the job's store.
            self.waiting = Wait(time.monotonic(), point.describe(), False, main, (), wbase, seq)
            with contextlib.suppress(Late):
                data = self.mail.receive(wbase, seq, self.rank, mine)
        if data is None:
            data = dump_verdict(self._give_up(wbase, seq, main, point, deadline))
        return self._heard(load_verdict(data), main, point, seq, True, deadline)

    # -- a member that gives up, and a main that answers anyway -------------------

    def _drop_claims(self, base: str, seq: int) -> None:
        """Delete the claims this main made before ``seq`` in ``base``:
        every member has had those verdicts, as each sent its frame for
        ``seq``.  (Claims are rare: only for members close to their
        deadline.)"""
        claimed = self.claimed.pop(base, None)
        if claimed is None:
            return
        later = [(at, m) for at, m in claimed if at >= seq]
        if later:
            self.claimed[base] = later
        for at, m in claimed:
            if at < seq:
                self.store.delete_key(f"{base}/claim/{at}/{m}")

    def _claim(self, base: str, seq: int, member: int, claim: bytes) -> bytes:
        """Settle, once and for all, whether ``member`` waits for this sync
        point's verdict (the main claims b"answered") or gave up on it (the
        member claims b"withdrawn"); returns whichever claim came first."""
        return bytes(self.store.compare_set(f"{base}/claim/{seq}/{member}", "", claim))

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
                self._say_exit(failure, self.store, first_hand=True)
            finally:
                self.lock.release()
        elif self.spare is not None:
            # A thread is inside a sync point, blocked on this exchange's
            # connection (the store client holds it for the whole wait), and
            # may never finish it: the exit goes there too (``in_flight``).
            self._say_exit(failure, self.spare, first_hand=True, spare=True)

    def report_killed(
        self, failure: Failure, store: Any, *, elsewhere: Sequence[int] | None = None
    ) -> bool:
        """Report the exit of a rank on this node whose process ended
        without saying so itself; False if it had said how it ended, or
        another rank reported a different end first.  (Two reports of the
        same end both return True: a compare-and-set cannot tell them
        apart, and the second one's offers never replace the first's.)
        The ranks are in step, so the next sync point that rank
        would have joined is this rank's current one or the one after.
        ``elsewhere``: the rank is on another node, whose ranks these are
        (its node was lost, or its pulse saw it end)."""
        where = None
        if elsewhere is not None:
            tier = self.tier
            layout = None if tier is None else tier.layout
            where = protocol.waiters_elsewhere(failure.rank, self.world_size, layout, elsewhere)
        return self._say_exit(failure, store, first_hand=False, where=where)

    def _say_exit(
        self,
        failure: Failure,
        store: Any,
        *,
        first_hand: bool,
        spare: bool = False,
        where: Sequence[protocol.Waiter] | None = None,
    ) -> bool:
        """``exits.say_exit``, with where this rank's node's store is: its
        own connection to it (first hand), or the spare (``spare``, or second
        hand); none for a node's main's exit reported second hand (its
        node's store went with it).  ``spare``, first hand: a thread of this
        rank is inside a sync point (see ``exits.say_exit``'s ``in_flight``)."""
        tier = self.tier
        node = None
        if tier is not None and (first_hand or failure.rank != tier.main):
            node = tier.spare if spare or not first_hand else tier.store
        if where is None:
            layout = None if tier is None else tier.layout
            where = protocol.waiters(failure.rank, self.world_size, layout, self.node_main())
        return say_exit(
            failure,
            store,
            node,
            self.seq,
            where,
            prefix=self.prefix,
            transport=self.transport,
            first_hand=first_hand,
            in_flight=first_hand and spare,
        )

    def node_main(self) -> int | None:
        """The rank of this node's main, if this rank knows it (a rank that
        never met its node at a sync point does not)."""
        if self.node is not None:
            return self.node[0]
        return self.rank if self.place.local_rank == 0 else None
