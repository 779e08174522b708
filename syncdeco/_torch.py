"""The torch.distributed backend.

Sync traffic does not go through collectives.  Each sync point is a star
exchange over the process group's c10d store (syncdeco clones its own
connection to it): every member pushes a small frame (its status and the sync
point's identity) to the scope main, the main compares them and pushes one
verdict back to each member.  The store is what makes this safe:

* a wait on it can time out and the connection stays usable, so a missing
  rank turns into ``SyncTimeoutError`` instead of a pair torn down (Gloo
  tears the pair down when a point-to-point wait times out) or a hang until
  the process-group timeout;
* it is the same for Gloo and NCCL, so no CUDA tensor carries sync traffic;
* a frame carries failures and small results along with the sync itself.

Every frame carries the scope's sequence number, so a frame left behind by a
sync point that timed out is recognised and dropped at the next one.
"""

from __future__ import annotations

import ctypes
import functools
import io
import logging
import mmap
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, replace
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, cast, final

import torch
import torch.distributed as dist

from ._backend import Backend, Failure, NullBackend, SyncPoint, warn_interval
from ._env import (
    Launch,
    detect_launch,
    local_rank_from_env,
    local_world_size_from_env,
    node_key,
)
from ._errors import (
    PeerFailedError,
    RankExitedError,
    SyncError,
    SyncMismatchError,
    SyncTimeoutError,
    whereabouts,
)
from ._startup import JobStore, StoreUnreachable, open_store, store_for_exit_notice, tcp_is_server

__all__ = ["TorchBackend", "auto_backend", "backend_from_name"]

_PREFIX: Final = "syncdeco"
_OK, _FAILED, _MISMATCH, _TIMEOUT = range(4)
_FOREVER_CHUNK: Final = 3600.0  # one store wait, when a sync point waits forever
_MIN_WAIT: Final = 0.001
_GRACE: Final = 1.0  # extra seconds a member waits for the main's verdict
_WITHDRAW_MARGIN: Final = 1.0  # seconds before a member's deadline to look for its withdrawal


_log = logging.getLogger("syncdeco")


def _no_group() -> None:
    return None


class _Late(Exception):
    """A store wait ran out of time (internal)."""


class _Mail:
    """Ordered boxes on a store: queues where the store has them, else keys."""

    def __init__(self, store: Any, queues: bool | None = None) -> None:  # a c10d Store
        self.store = store
        if queues is None:
            try:
                store.queue_len(f"{_PREFIX}/probe")
                queues = True
            except Exception:  # FileStore and friends: no queue support
                queues = False
        self.queues = queues

    def _timeout(self, seconds: float) -> timedelta:
        return timedelta(seconds=max(seconds, _MIN_WAIT))

    def send(self, box: str, seq: int, data: bytes) -> None:
        if self.queues:
            self.store.queue_push(box, data)
        else:
            self.store.set(f"{box}/{seq}", data)

    def offer(self, box: str, seq: int, data: bytes) -> None:
        """Like send, but never replaces what the box already holds for
        ``seq`` (with keys; a queue keeps both, in order)."""
        if self.queues:
            self.store.queue_push(box, data)
        else:
            self.store.compare_set(f"{box}/{seq}", "", data)

    def ready(self, box: str, seq: int) -> bool:
        if self.queues:
            return bool(self.store.queue_len(box) > 0)
        return bool(self.store.check([f"{box}/{seq}"]))

    def recv(self, box: str, seq: int, deadline: float | None) -> bytes:
        """The next frame in ``box``; raises _Late once ``deadline`` passes."""
        empty_pops = 0
        while True:
            left = _FOREVER_CHUNK if deadline is None else deadline - time.monotonic()
            if left <= 0 and not self.ready(box, seq):
                raise _Late
            try:
                if self.queues:
                    self.store.set_timeout(self._timeout(left))
                    return bytes(self.store.queue_pop(box, block=True))
                key = f"{box}/{seq}"
                self.store.wait([key], self._timeout(left))
                data = bytes(self.store.get(key))
                self.store.delete_key(key)
                return data
            except dist.QueueEmptyError:
                # The store's wait on a queue key can return while the queue
                # is empty (a race in the store server); back off and wait
                # again rather than spin.
                empty_pops += 1
                time.sleep(min(1e-5 * 2**empty_pops, 1e-3))
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc).lower():
                    raise SyncError(
                        f"syncdeco lost the process group's store while waiting: "
                        f"{exc}. Rank 0 or the launcher may have exited."
                    ) from exc
                if deadline is not None and time.monotonic() >= deadline:
                    raise _Late from None


@final
class _Channel:
    """syncdeco's connection to one process group, and the counters that keep
    the ranks' sync points in step.  Shared by every TorchBackend of the group."""

    def __init__(
        self,
        group: object | None,
        env: Mapping[str, str],
        *,
        job: JobStore | None = None,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "gloo",
    ) -> None:
        # Weakly: a strong reference would keep the group alive after
        # destroy_process_group(), until interpreter teardown, where Gloo's
        # threads abort the process ("terminate called without an active
        # exception").
        self.group: Callable[[], object | None] = _no_group if group is None else weakref.ref(group)
        self.job = job  # the launcher's store, when the group is still to be made
        self.backend = backend  # the group to make: its backend
        store: Any
        if job is None:
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
            store = cast(Any, dist.distributed_c10d._get_default_store()).clone()
            self.spare: Any = None
        else:
            self.rank, self.world_size = rank, world_size
            store = job.store.clone()
            self.spare = job.store
        self.mail = _Mail(store)
        self.store = store
        self.lock = threading.Lock()
        self.seq: dict[str, int] = {}
        self.node: tuple[int, tuple[int, ...]] | None = None
        local = local_rank_from_env(env)
        self.local_rank = self.rank if local is None else local
        self.local_size = local_world_size_from_env(env)
        self.node_key = node_key(env)
        self.waiting: _Wait | None = None  # read by the watcher thread
        self.left = False  # this process has said it is exiting
        self.watcher: threading.Thread | None = None
        # Where this rank lives, for local=True: per node (so a local sync
        # waits only for its own node) and, when the launcher does not say
        # how many ranks share a node, for the whole world.
        store.set(f"{_PREFIX}/node/{self.node_key}/{self.local_rank}", str(self.rank))
        if self.local_size is None:
            store.set(f"{_PREFIX}/topo/{self.rank}", pickle.dumps((self.node_key, self.local_rank)))

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
        if self.local_rank != 0:
            key = f"{_PREFIX}/node/{self.node_key}/0"
            guess = self.rank - self.local_rank  # torchrun numbers a node's ranks in a row
            self._wait_keys([key], [guess], deadline, point)
            return int(self.store.get(key)), ()
        if self.local_size is not None:
            local_ranks = range(1, self.local_size)
            keys = [f"{_PREFIX}/node/{self.node_key}/{lr}" for lr in local_ranks]
            self._wait_keys(keys, [self.rank + lr for lr in local_ranks], deadline, point)
            return self.rank, tuple(int(v) for v in self.store.multi_get(keys)) if keys else ()
        keys = [f"{_PREFIX}/topo/{r}" for r in range(self.world_size)]
        self._wait_keys(keys, list(range(self.world_size)), deadline, point)
        facts = [pickle.loads(v) for v in self.store.multi_get(keys)]
        node = sorted((lr, r) for r, (key, lr) in enumerate(facts) if key == self.node_key)
        return self.rank, tuple(r for _, r in node if r != self.rank)

    def _wait_keys(
        self, keys: list[str], ranks: list[int], deadline: float | None, point: SyncPoint
    ) -> None:
        while True:
            left = _FOREVER_CHUNK if deadline is None else deadline - time.monotonic()
            try:
                if keys:
                    self.store.wait(keys, timedelta(seconds=max(left, _MIN_WAIT)))
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

    def next_seq(self, scope: str) -> int:
        seq = self.seq.get(scope, 0) + 1
        self.seq[scope] = seq
        return seq

    # -- the exchange ---------------------------------------------------------

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
            seq = self.next_seq("l" if local and self.world_size > 1 else "w")
            try:
                # Where this rank was last seen, for the others' timeouts and
                # warnings (a store set has no reply: it costs one send).
                self.store.set(
                    f"{_PREFIX}/seen/{self.rank}", pickle.dumps((point.describe(), time.time()))
                )
                scope, main, members = self.scope(local, deadline, point)
                if main == self.rank and not members:
                    if scope == "w":
                        self.make_group()  # a world of one
                    return payload  # alone in its scope (members know only their main)
                base = f"{_PREFIX}/{scope}/{main}"
                if self.watcher is None:
                    self._start_watcher()
                if self.rank == main:
                    return self._lead(
                        base, seq, members, point, failure, payload, deadline, timeout
                    )
                if deadline is not None and timeout is not None:
                    # A member waits a little longer than the main rank, so
                    # that when another rank is missing it hears so from the
                    # main (which knows who) instead of blaming the main.
                    deadline += min(max(_GRACE, 0.1 * timeout), 10 * _GRACE)
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

    def make_group(self) -> None:
        """After a world sync point where every rank arrived and all is well:
        make the process group over the job's store, if this channel was
        opened before one existed.  Every rank of the world does so at the
        same sync point, having just met, so Gloo's rendezvous is quick."""
        job = self.job
        if job is None or self.group() is not None:
            return
        if dist.is_initialized():  # made by the program since: use it as it is
            group = dist.distributed_c10d._get_default_group()
        else:
            dist.init_process_group(
                self.backend,
                store=job.group_store(),
                rank=self.rank,
                world_size=self.world_size,
            )
            group = dist.distributed_c10d._get_default_group()
        self.group = weakref.ref(group)
        _remember_group()

    def leave(self, failure: Failure) -> None:
        """This rank's process is ending: say so, with ``failure``, in one
        store write (the others' watchers look for it while they wait)."""
        self.left = True
        if self.lock.acquire(blocking=False):
            try:
                _say_gone(self.store, failure)
            finally:
                self.lock.release()
        elif self.spare is not None:
            _say_gone(self.spare, failure)  # the job store's first connection
        elif dist.is_initialized():
            # A thread is inside a sync point, blocked on this channel's
            # connection (the store client holds it for the whole wait): say
            # it through the group's own connection instead.
            _say_gone(dist.distributed_c10d._get_default_store(), failure)

    def wake_if_gone(self, wait: _Wait, store: Any) -> None:
        """If a rank this one waits for has said it is gone, put what that
        rank would have sent into the box the waiting thread reads: an exit
        frame for a main, a FAILED verdict for a member.  Runs in the watcher
        thread, on its own store connection."""
        blocked_on: int | None = None
        if wait.lead:
            arrived = set(wait.arrived.copy())  # the waiting thread adds to it
            missing = [r for r in wait.members if r not in arrived]
            # The main reads the members' boxes in order: it is blocked on
            # the first missing one, looked at every time; the others take
            # turns in large jobs.
            blocked_on = missing[0] if missing else None
            rest = [r for r in missing[1:] if r not in wait.woken]
            turn = [rest[(wait.cursor + i) % len(rest)] for i in range(min(len(rest), _GONE_BATCH))]
            wait.cursor += _GONE_BATCH
            awaited = [r for r in missing[:1] if r not in wait.woken] + turn
        else:
            awaited = [] if wait.main in wait.woken else [wait.main]
        mail: _Mail | None = None
        for rank in awaited:
            key = f"{_PREFIX}/gone/{rank}"
            if not store.check([key]):
                continue
            failure = Failure(*pickle.loads(store.get(key)))
            mail = mail or _Mail(store, queues=self.mail.queues)
            wait.woken.add(rank)
            if wait.lead:
                frame = pickle.dumps(
                    (wait.seq, rank, "exit", "", 0, astuple(failure), "its exit", None)
                )
                mail.offer(f"{wait.base}/{rank}/up", wait.seq, frame)
                if blocked_on is not None and blocked_on != rank:
                    # Also where the main is blocked, on a member that may be
                    # slow or never come (stuck in a collective with the gone
                    # rank): it reads the exit there, and that member's own
                    # frame is dropped as stale at the next sync point.
                    mail.offer(f"{wait.base}/{blocked_on}/up", wait.seq, frame)
            else:
                verdict = _failed(wait.seq, [(failure, None)])
                mail.offer(f"{wait.base}/{self.rank}/down", wait.seq, pickle.dumps(verdict))

    # -- where the others are ----------------------------------------------------

    def last_seen(self, ranks: Sequence[int], store: Any = None) -> dict[int, str | None]:
        """The last sync point each rank was seen at, with how long ago."""
        store = self.store if store is None else store
        seen: dict[int, str | None] = {}
        for rank in ranks:
            key = f"{_PREFIX}/seen/{rank}"
            if not store.check([key]):
                seen[rank] = None
                continue
            where, when = pickle.loads(store.get(key))
            seen[rank] = f"{where}, {max(0.0, time.time() - when):.0f}s ago"
        return seen

    def _start_watcher(self) -> None:
        self.watcher = threading.Thread(
            target=_watch, args=(weakref.ref(self),), name="syncdeco-watch", daemon=True
        )
        self.watcher.start()

    def warn(self, wait: _Wait, now: float, store: Any) -> None:
        waited = now - wait.since
        if wait.lead:
            arrived = list(wait.arrived)  # a snapshot: the waiting thread adds to it
            missing = [r for r in wait.members if r not in arrived]
            seen = self.last_seen(missing, store)
            _log.warning(
                "rank %d has waited %.0fs at %s: arrived %s; missing %s",
                self.rank,
                waited,
                wait.point,
                ", ".join(map(str, sorted(arrived))) or "none",
                ", ".join(whereabouts(r, seen[r]) for r in missing) or "none",
                extra={"rank": self.rank},
            )
        else:
            seen = self.last_seen([wait.main], store)
            _log.warning(
                "rank %d has waited %.0fs at %s for the main rank %s",
                self.rank,
                waited,
                wait.point,
                whereabouts(wait.main, seen[wait.main]),
                extra={"rank": self.rank},
            )

    def _fresh(self, box: str, seq: int, deadline: float | None) -> tuple[object, ...]:
        # Frames older than this sync point were left by one that timed out.
        while True:
            frame: tuple[object, ...] = pickle.loads(self.mail.recv(box, seq, deadline))
            if not isinstance(frame[0], int) or frame[0] >= seq:
                return frame

    def _claim(self, base: str, seq: int, member: int, claim: bytes) -> bytes:
        """Settle, once and for all, whether ``member`` waits for this sync
        point's verdict (the main claims b"answered") or gave up on it (the
        member claims b"withdrawn"); returns whichever claim came first."""
        key = f"{base}/{member}/claim/{seq}"
        return bytes(self.store.compare_set(key, "", claim))

    def _withdrawn(self, base: str, seq: int, arrived: dict[int, tuple[object, ...]]) -> bool:
        """Whether a member gave up waiting before this rank could answer.

        Only members whose own deadline is near (by the wall clock, with a
        margin for clocks that differ between hosts) are asked, so a sync
        point that completes in time costs nothing extra."""
        now = time.time()
        gone = False
        for member, frame in arrived.items():
            give_up = cast("float | None", frame[7])
            if give_up is not None and now >= give_up - _WITHDRAW_MARGIN:
                gone |= self._claim(base, seq, member, b"answered") == b"withdrawn"
        return gone

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
        arrived: dict[int, tuple[object, ...]] = {}
        missing: list[int] = []
        self.waiting = _Wait(
            time.monotonic(), point.describe(), True, self.rank, tuple(members), arrived, base, seq
        )
        for member in members:
            box = f"{base}/{member}/up"
            try:
                if missing:  # out of time already: take only what is there
                    if not self.mail.ready(box, seq):
                        raise _Late
                    arrived[member] = self._fresh(box, seq, time.monotonic())
                else:
                    arrived[member] = self._fresh(box, seq, deadline)
            except _Late:
                missing.append(member)

        mine = (seq, point.kind, point.name, point.count)
        own_error: BaseException | None = None
        verdict: tuple[object, ...]
        wires: list[torch.Tensor] = []
        # Each failure with the sync point where its rank reported it.
        failures = [] if failure is None else [(failure, point.describe())]
        failures += [(Failure(*f[5]), str(f[6])) for f in arrived.values() if f[5] is not None]  # type: ignore[misc]
        tensors: list[torch.Tensor] = []
        data: bytes | None = None
        exits = [failed for failed in failures if failed[0].exited]
        if exits:
            verdict = _failed(seq, exits)  # a rank that is gone explains the others' absence
        elif missing:
            verdict = (seq, _TIMEOUT, tuple(missing), self.last_seen(missing))
        elif failures:
            # A failure wins over a mismatch: a rank that raised reports it at
            # whatever sync point it is at, and its error is the cause.
            verdict = _failed(seq, failures)
        elif any(tuple(f[0:1] + f[2:5]) != mine for f in arrived.values()):
            where: dict[str, list[int]] = {point.describe(): [self.rank]}
            for r, f in arrived.items():
                desc = f[6] if f[0] == seq else f"{f[6]} [its sync #{f[0]}, this is #{seq}]"
                where.setdefault(str(desc), []).append(r)
            verdict = (seq, _MISMATCH, {k: tuple(v) for k, v in where.items()})
        else:
            try:
                # On the world scope, tensors travel by dist.broadcast, not
                # pickle; they are made ready before any member is told a
                # broadcast follows, so a failure here is an ordinary one.
                if payload is not None:
                    data = _dumps(payload, tensors if base_is_world(base) else None)
                    wires = [_on_wire(t, self.backend) for t in tensors]
                verdict = (seq, _OK, data, [_meta(t) for t in tensors])
            except Exception as exc:
                exc.add_note(
                    f"syncdeco: rank {self.rank} could not pickle the result of "
                    f"{point.describe()} to broadcast it; return something picklable."
                )
                own_error = exc
                verdict = _failed(seq, [(Failure.from_exception(self.rank, exc), None)])
        if verdict[1] != _TIMEOUT and self._withdrawn(base, seq, arrived):
            verdict, wires, own_error = (seq, _TIMEOUT, (self.rank,)), [], None  # came too late

        frame = pickle.dumps(verdict, protocol=pickle.HIGHEST_PROTOCOL)
        for member in members:
            self.mail.send(f"{base}/{member}/down", seq, frame)
        if own_error is not None:
            raise own_error
        if verdict[1] == _OK:
            if base_is_world(base):
                self.make_group()
            for wire in wires:  # every member got the shapes in its verdict
                dist.broadcast(wire, src=self.rank)
            return payload
        self._raise(verdict, point, timeout)
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
        failed = None
        if failure is not None:
            failed = astuple(failure)
        give_up = None if deadline is None else time.time() + (deadline - time.monotonic())
        frame = (
            seq,
            self.rank,
            point.kind,
            point.name,
            point.count,
            failed,
            point.describe(),
            give_up,
        )
        up, down = f"{base}/{self.rank}/up", f"{base}/{self.rank}/down"
        self.mail.send(up, seq, pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL))
        self.waiting = _Wait(time.monotonic(), point.describe(), False, main, (), {}, base, seq)
        try:
            verdict = self._fresh(down, seq, deadline)
        except _Late:
            # Give up, unless the verdict has just come or the main rank has
            # already committed to answering (then it is on its way, and the
            # ranks must agree on it).
            late: tuple[object, ...] | None = None
            try:
                if self.mail.ready(down, seq):
                    late = self._fresh(down, seq, time.monotonic())
            except _Late:
                pass
            if late is None and self._claim(base, seq, self.rank, b"withdrawn") == b"answered":
                late = self._fresh(down, seq, None)
            if late is None:
                raise SyncTimeoutError(
                    missing=(main,),
                    point=point.describe(),
                    timeout=timeout or 0.0,
                    observer=self.rank,
                    last_seen=self.last_seen([main]),
                ) from None
            verdict = late
        if verdict[1] == _OK:
            if base_is_world(base):
                self.make_group()
            data = verdict[2]
            metas = cast("list[_Meta]", verdict[3])
            tensors = []
            for meta in metas:
                wire = _receive_buffer(meta[0], meta[1], _wire_device())
                dist.broadcast(wire, src=main)
                tensors.append(_off_wire(wire, meta))
            if data is None:
                return None
            try:
                return _loads(data, tensors)  # type: ignore[arg-type]
            except Exception as exc:
                raise SyncError(
                    f"rank {self.rank} could not unpickle the result rank {main} "
                    f"broadcast at {point.describe()}: {exc!r}. Make sure its type "
                    f"can be imported on every rank."
                ) from exc
        self._raise(verdict, point, timeout)
        return None

    def _raise(self, verdict: tuple[object, ...], point: SyncPoint, timeout: float | None) -> None:
        code, detail = verdict[1], verdict[2]
        if code == _FAILED:
            rank, exc_type, message, tb, exited = cast(tuple[int, str, str, str, bool], detail)
            if rank == self.rank:
                return  # the caller re-raises its own exception
            raise (RankExitedError if exited else PeerFailedError)(
                rank=rank,
                exc_type=exc_type,
                message=message,
                remote_traceback=tb,
                point=point.describe(),
                observer=self.rank,
                raised_at=cast("str | None", verdict[3]),
            )
        if code == _MISMATCH:
            raise SyncMismatchError(points=detail, observer=self.rank)  # type: ignore[arg-type]
        if code == _TIMEOUT:
            raise SyncTimeoutError(
                missing=detail,  # type: ignore[arg-type]
                point=point.describe(),
                timeout=timeout or 0.0,
                observer=self.rank,
                last_seen=verdict[3] if len(verdict) > 3 else None,  # type: ignore[arg-type]
            )
        raise SyncError(f"rank {self.rank} got an unknown verdict {code!r} at {point.describe()}")


# -- results: plain objects by pickle, tensors by dist.broadcast ------------------

_Meta = tuple[tuple[int, ...], torch.dtype, str, bool, bool]  # shape, dtype, device, grad, param


def base_is_world(base: str) -> bool:
    return base.startswith(f"{_PREFIX}/w/")


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors
        self.seen: dict[int, int] = {}

    def persistent_id(self, obj: object) -> int | None:
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return None
        tensor = cast(torch.Tensor, obj)
        if (
            tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.device.type not in ("cpu", "cuda")
        ):
            return None  # pickled like any other object
        index = self.seen.get(id(tensor))
        if index is None:  # the same tensor twice is sent once, and stays one
            index = self.seen[id(tensor)] = len(self.tensors)
            self.tensors.append(tensor)
        return index


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: object) -> torch.Tensor:
        return self.tensors[cast(int, pid)]


def _dumps(payload: object, tensors: list[torch.Tensor] | None) -> bytes:
    if tensors is None:
        return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    buffer = io.BytesIO()
    _Pickler(buffer, tensors).dump(payload)
    return buffer.getvalue()


def _loads(data: bytes, tensors: list[torch.Tensor]) -> object:
    return _Unpickler(io.BytesIO(data), tensors).load()


def _failed(seq: int, failures: Sequence[tuple[Failure, str | None]]) -> tuple[object, ...]:
    """The FAILED verdict: the failure of the lowest rank (where several
    raised), and the sync point where it reported it (None: where the others
    are, or its exit)."""
    first, where = min(failures, key=lambda failed: failed[0].rank)
    return (seq, _FAILED, astuple(first), None if first.exited else where)


def _meta(tensor: torch.Tensor) -> _Meta:
    return (
        tuple(tensor.shape),
        tensor.dtype,
        tensor.device.type,
        tensor.requires_grad,
        isinstance(tensor, torch.nn.Parameter),
    )


def _wire_device() -> torch.device:
    return _device_of(str(dist.get_backend()))


def _device_of(backend: str) -> torch.device:
    # NCCL moves CUDA tensors only; Gloo moves CPU tensors.
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_HUGE_PAGE: Final = 2 << 20
_PAGE: Final = mmap.PAGESIZE
# glibc serves an allocation this large from a mapping of its own (its mmap
# threshold never rises above it on 64-bit), so advice given to the buffer's
# pages goes away with the buffer instead of staying on the heap.
_OWN_MAPPING: Final = 32 << 20
_MADV_HUGEPAGE: Final = 14  # Linux; harmless where transparent huge pages are off
_MADV_POPULATE_WRITE: Final = 23  # Linux 5.14+; older kernels refuse it, harmlessly


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", fn)


def _receive_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor for a broadcast to land in.

    Writing into fresh memory page-faults once per 4 KiB page, which costs a
    large CPU broadcast more than the copy itself (measured: 64 MiB over
    Gloo at 2 ranks, 32 ms into a new tensor against 15 ms into a reused
    one).  So a buffer of 32 MiB or more, which has a mapping of its own,
    asks for transparent huge pages on its 2 MiB-aligned interior (what
    torch's THP_MEM_ALLOC_ENABLE does, for this buffer only) and is faulted
    in with one call before the broadcast starts: about 21 ms.  Faulting
    huge pages in during the receive instead was faster at the median but
    had 50 to 180 ms outliers.  Both calls are advice: where the kernel
    refuses them, the buffer is an ordinary one.
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    nbytes = tensor.numel() * tensor.element_size()
    if device.type == "cpu" and nbytes >= _OWN_MAPPING and (madvise := _madvise()):
        start, end = tensor.data_ptr(), tensor.data_ptr() + nbytes
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = end // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            madvise(first, last - first, _MADV_HUGEPAGE)
        page = start // _PAGE * _PAGE
        madvise(page, -(-end // _PAGE) * _PAGE - page, _MADV_POPULATE_WRITE)
    return tensor


def _on_wire(tensor: torch.Tensor, backend: str) -> torch.Tensor:
    device = _wire_device() if dist.is_initialized() else _device_of(backend)
    return tensor.detach().resolve_conj().resolve_neg().to(device).contiguous()


def _off_wire(wire: torch.Tensor, meta: _Meta) -> torch.Tensor:
    # A tensor comes back where the main rank had it: CPU stays CPU, a CUDA
    # tensor lands on this rank's current CUDA device.
    _, _, device_type, requires_grad, is_parameter = meta
    if device_type == "cpu":
        tensor = wire.cpu()
    elif device_type == "cuda":
        tensor = wire.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        tensor = wire
    if is_parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad)


@final
class _Wait:
    """What a rank is waiting for right now, for the watcher thread."""

    __slots__ = (
        "arrived",
        "base",
        "cursor",
        "lead",
        "logged",
        "main",
        "members",
        "point",
        "seq",
        "since",
        "woken",
    )

    def __init__(
        self,
        since: float,
        point: str,
        lead: bool,
        main: int,
        members: tuple[int, ...],
        arrived: dict[int, tuple[object, ...]],
        base: str,
        seq: int,
    ) -> None:
        self.since = since
        self.point = point
        self.lead = lead
        self.main = main
        self.members = members
        self.arrived = arrived
        self.logged = since
        self.base = base
        self.seq = seq
        self.woken: set[int] = set()  # gone ranks already answered for
        self.cursor = 0


def _watch(ref: weakref.ref[_Channel]) -> None:
    """Log, once per interval, about a sync point that waits too long, and
    wake it when a rank it waits for has exited.

    Runs beside the waiting thread with its own store connection, so a sync
    point that completes quickly never pays for it."""
    store: Any = None
    while True:
        interval = warn_interval()
        time.sleep(_GONE_AFTER if interval is None else min(_GONE_AFTER, interval / 4))
        channel = ref()
        if channel is None:
            return
        store = _look(channel, interval, store)
        del channel  # hold no channel while asleep, so it can be collected


def _look(channel: _Channel, interval: float | None, store: Any) -> Any:
    """One round of the watcher: wake a sync point waiting for a rank that
    exited, and log about one that waits too long.  Returns the watcher's
    store connection (made on first need)."""
    wait = channel.waiting
    now = time.monotonic()
    jobs: list[tuple[str, Callable[[Any], None]]] = []
    if wait is not None and now - wait.since >= _GONE_AFTER:
        jobs.append(("look for ranks that exited", functools.partial(channel.wake_if_gone, wait)))
    if wait is not None and interval is not None and now - wait.logged >= interval:
        wait.logged = now
        jobs.append(("report", functools.partial(channel.warn, wait, now)))
    for what, job in jobs:
        try:
            if store is None:
                store = channel.store.clone()
                store.set_timeout(timedelta(seconds=_WATCHER_WAIT))
            job(store)
        except Exception as exc:  # the watcher must never take the job down
            _log.debug(
                "rank %d: syncdeco's watcher could not %s: %r",
                channel.rank,
                what,
                exc,
                extra={"rank": channel.rank},
            )
    return store


_channel_lock = threading.Lock()
_channel: _Channel | None = None

# The last default group this process saw, with its rank and world size
# there: after destroy_process_group() they are still its rank facts, and a
# sync point raises instead of finding no group and running alone on the
# Null backend.
_last_group: tuple[weakref.ref[Any], int, int] | None = None


def _remember_group() -> None:
    global _last_group
    group = dist.distributed_c10d._get_default_group()
    if _last_group is None or _last_group[0]() is not group:
        _last_group = (weakref.ref(group), dist.get_rank(), dist.get_world_size())


def _channel_for_default_group(env: Mapping[str, str]) -> _Channel:
    global _channel
    group = dist.distributed_c10d._get_default_group()
    with _channel_lock:
        if _channel is None or _channel.group() is not group:
            _channel = _Channel(group, env)
            _remember_group()
            _note_uncaught()
        return _channel


# -- a rank whose process ends tells the others ---------------------------------

_GONE_AFTER: Final = 1.0  # seconds a sync point waits before its watcher looks for exits
_GONE_BATCH: Final = 64  # missing ranks a main's watcher looks at per second
_WATCHER_WAIT: Final = 10.0  # seconds one of the watcher's store requests may take
_forked_child = False  # forked from a process with a group (see _forget_in_child)


def announce_exit(exc: BaseException | None, *, at_exit: bool = False) -> None:
    """Say in the store that this rank's process is ending (``exc``: the
    exception that ends it, if any).  A rank waiting for it at a sync point
    (now or later) then raises RankExitedError within about a second instead
    of at its timeout.  Runs at interpreter exit (syncdeco registers it on
    import) and where syncdeco.testing ends a rank; a process killed by a
    signal, or ended by os._exit(), runs neither.  One store write."""
    channel = _channel
    try:
        if channel is not None:
            channel.leave(_exit_failure(channel.rank, exc))
        elif not _forked_child and _DISTRIBUTED and dist.is_initialized():
            # No sync point ran here yet, but the others may be waiting at
            # their first: through the group's own store.  (A forked child's
            # group state is its parent's: it stays silent.)
            store = dist.distributed_c10d._get_default_store()
            _say_gone(store, _exit_failure(dist.get_rank(), exc))
        elif not _forked_child and _DISTRIBUTED and _last_group is None:
            # No group yet: the others may be waiting at their first sync
            # point, over the launcher's store.  Reached within a couple of
            # seconds or not at all; never where this rank would host it.
            launch = detect_launch(os.environ)
            job_store = store_for_exit_notice(launch, os.environ, child=not at_exit)
            if launch is not None and job_store is not None:
                _say_gone(job_store, _exit_failure(launch.rank, exc))
    except Exception:
        pass  # exiting anyway: the others fall back on their timeout


def _exit_failure(rank: int, exc: BaseException | None) -> Failure:
    if exc is None:
        return Failure(rank, "", "", "", exited=True)
    return replace(Failure.from_exception(rank, exc), exited=True)


def _say_gone(store: Any, failure: Failure) -> None:
    # A set has no reply: one send, so it neither blocks on a store that has
    # gone nor makes the store client log a broken pipe.
    store.set(f"{_PREFIX}/gone/{failure.rank}", pickle.dumps(astuple(failure)))


_uncaught: BaseException | None = None  # what ended the program, seen by _note_uncaught's hook
_hook: Callable[..., None] | None = None


def _note_uncaught() -> None:
    """Wrap sys.excepthook (once) to note the exception that ends the program.
    sys.last_value alone misleads: pytest and IPython set it for exceptions
    they caught."""
    global _hook
    if _hook is not None:
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        global _uncaught
        _uncaught = value
        previous(kind, value, tb)

    _hook = sys.excepthook = hook


def exit_notice() -> None:
    """At interpreter exit: ``announce_exit`` with the exception that ended
    the program, if one did."""
    exc: object = _uncaught
    if exc is None and (_hook is None or sys.excepthook is not _hook):
        # Without syncdeco's hook in place (no sync point ran yet, or another
        # hook replaced it), the interpreter's note is the best there is.
        exc = getattr(sys, "last_value", None)
    announce_exit(exc if isinstance(exc, BaseException) else None, at_exit=True)


@final
class TorchBackend:
    """Sync points over the default torch.distributed process group.

    Works with any process-group backend (Gloo, NCCL, ...): sync traffic goes
    through the group's store.  If no process group exists when it is first
    needed, it initialises one from the launcher's environment with
    ``backend`` (default: ``"nccl"`` when CUDA is available, else ``"gloo"``).
    """

    __slots__ = ("__weakref__", "_backend", "_env")

    def __init__(self, backend: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            raise ValueError(f"TorchBackend(backend={backend!r}): expected 'gloo' or 'nccl'")
        self._backend = backend
        self._env = os.environ if env is None else env

    def __repr__(self) -> str:
        return f"TorchBackend({self._backend!r})" if self._backend else "TorchBackend()"

    def _launch(self) -> Launch:
        launch = detect_launch(self._env)
        if launch is None:
            raise SyncError(
                "TorchBackend has no process group: torch.distributed is not "
                "initialised and no launcher environment (RANK/WORLD_SIZE from "
                "torchrun, SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_RANK/SIZE) "
                "was found. Launch with torchrun, call "
                "torch.distributed.init_process_group() first, or use NullBackend()."
            )
        return launch

    def ensure_group(self, point: SyncPoint | None = None, timeout: float | None = None) -> None:
        """Bring up the default process group unless one exists: every rank
        must call it.  It is a sync point (``syncdeco.init``, waiting up to
        ``timeout`` seconds, None: forever): the group is made once every
        rank has arrived there.  Raises ``SyncError`` if this process's
        group has been destroyed."""
        if dist.is_initialized():
            return
        _refuse_destroyed(point)
        global _inits
        _inits += 1
        here = SyncPoint("init", "syncdeco.init", _inits, "syncdeco.init()")
        self.sync(here, local=False, failure=None, payload=None, timeout=timeout)

    def _channel(self, point: SyncPoint | None, timeout: float | None) -> _Channel:
        """The channel for a sync point: over the default group's store, or,
        before any group exists, over the launcher's store (``timeout``: how
        long to try to reach it)."""
        if dist.is_initialized():
            return _channel_for_default_group(self._env)
        _refuse_destroyed(point)
        return self._startup_channel(point, timeout)

    def _startup_channel(self, point: SyncPoint | None, timeout: float | None) -> _Channel:
        global _channel
        channel = _channel
        if channel is not None and channel.job is not None and channel.group() is None:
            return channel
        launch = self._launch()
        name = self._backend or ("nccl" if torch.cuda.is_available() else "gloo")
        try:
            job = open_store(launch, self._env, timeout)
        except StoreUnreachable as exc:
            raise _unreachable(exc, launch, point, timeout) from exc.cause
        if name == "nccl":
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        with _channel_lock:
            if _channel is None or _channel.job is not job or _channel.group() is not None:
                _channel = _Channel(
                    None,
                    self._env,
                    job=job,
                    rank=launch.rank,
                    world_size=launch.world_size,
                    backend=name,
                )
                _note_uncaught()
            return _channel

    def prepare(self) -> None:
        """Say where this rank lives before a main rank runs a body that ends
        in a sync point.  Before any group exists, the rank that hosts the
        job's store (rank 0 outside torchrun) opens it now, so that the
        others can reach it while it runs an hour-long first ``main_first``."""
        if dist.is_initialized():
            _channel_for_default_group(self._env)
            return
        _refuse_destroyed(None)
        launch = self._launch()
        if tcp_is_server(launch, self._env):
            self._startup_channel(None, None)

    # Rank facts have no side effects: they come from the process group if
    # there is one, else from the group syncdeco was using if it has been
    # destroyed (this process's rank in the job has not changed), else from
    # the launcher's environment.

    def rank(self) -> int:
        if dist.is_initialized():
            return dist.get_rank()
        if _last_group is not None:
            return _last_group[1]
        return self._launch().rank

    def world_size(self) -> int:
        if dist.is_initialized():
            return dist.get_world_size()
        if _last_group is not None:
            return _last_group[2]
        return self._launch().world_size

    def local_rank(self) -> int:
        local = local_rank_from_env(self._env)
        return self.rank() if local is None else local

    def sync(
        self,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        """Meet the other ranks at ``point``; every rank of the scope must call it.

        Under ``torch.profiler`` the wait shows up as
        ``syncdeco.<kind>:<name>``; without a profiler this costs nothing."""
        channel = self._channel(point, timeout)
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(f"syncdeco.{point.kind}:{point.name}"):
                return channel.sync(point, local, failure, payload, timeout)
        return channel.sync(point, local, failure, payload, timeout)


_AUTO: Final = TorchBackend()
_inits = 0  # calls of ensure_group that made a sync point


def _refuse_destroyed(point: SyncPoint | None) -> None:
    if _last_group is not None:
        where = f"at {point.describe()}" if point is not None else "before a sync point"
        raise SyncError(
            f"rank {_last_group[1]} {where}: the process group this process used has "
            f"been destroyed (torch.distributed.destroy_process_group()), so no sync "
            f"point can be reached. Move sync points before the teardown, or "
            f"call init_process_group() again first."
        )


def _unreachable(
    exc: StoreUnreachable, launch: Launch, point: SyncPoint | None, timeout: float | None
) -> SyncError:
    """What a rank says when it cannot reach the job's store in time."""
    where = point.describe() if point is not None else "its first sync point"
    if exc.store.startswith("rank 0"):
        return SyncTimeoutError(
            missing=(0,),
            point=f"{where} [{exc.store}, and did not let rank {launch.rank} connect: "
            f"rank 0 has not started yet, or has exited]",
            timeout=timeout or 0.0,
            observer=launch.rank,
            last_seen={0: None},
        )
    return SyncError(
        f"rank {launch.rank} at {where} could not reach the job's store within "
        f"{exc.waited:g}s: {exc.store}, and did not let it connect ({exc.cause}). "
        f"The launcher's agent may have exited, or MASTER_ADDR/MASTER_PORT do not "
        f"point at it."
    )


# Whether the environment describes a multi-rank job, read once per process
# (a launcher sets it before the process starts); init() and reset() forget it.
_launched: list[bool] = []
_DISTRIBUTED: Final = dist.is_available()


def forget_environment() -> None:
    _launched.clear()


def _forget_in_child() -> None:
    # A forked child (notebook_launcher, multiprocessing) gets its own
    # variables, and is no member of the parent's group or channel.
    global _channel, _last_group, _forked_child
    _channel = _last_group = None
    # The parent's group, if any, looks initialised here too, but is not
    # this process's: it must not announce its exit there.
    _forked_child = _DISTRIBUTED and dist.is_initialized()
    forget_environment()


os.register_at_fork(after_in_child=_forget_in_child)


def auto_backend(env: Mapping[str, str]) -> TorchBackend | None:
    """The backend for an initialised group or a launcher's job, if any."""
    if not _DISTRIBUTED:
        return None
    if dist.is_initialized():
        if _last_group is None:  # on the hot path: one check; a new group is
            _remember_group()  # remembered when syncdeco first syncs over it
        return _AUTO
    if _last_group is not None:
        return _AUTO  # its group was destroyed: a sync point says so, rank facts stay

    if not _launched:
        launch = detect_launch(env)  # raises on a broken environment, every time
        _launched.append(launch is not None and launch.world_size > 1)
    return _AUTO if _launched[0] else None


def backend_from_name(name: str, env: Mapping[str, str]) -> Backend:

    if name == "null":
        return NullBackend()
    if name in ("gloo", "nccl"):
        return TorchBackend(name, env=env)
    raise ValueError(f"init(backend={name!r}): expected a Backend, 'null', 'gloo', 'nccl' or None")
