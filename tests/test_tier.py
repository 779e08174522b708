"""The node tier (``syncdeco._plane.tier``): 32 simulated ranks in nodes of
4, each a thread with its own connections, over a real TCPStore (the job's)
and real node stores hosted by each node's main, driving the product's own
``Exchange``.  Real processes on two torchrun "nodes" are in
``test_torchrun.py``; this is the protocol at a size real processes on two
cores cannot reach."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from scripted import read_until, start_script
from scripts.listeners import listening

from syncdeco import (
    PeerFailedError,
    RankExitedError,
    SyncMismatchError,
    SyncTimeoutError,
)
from syncdeco._backend import Failure, SyncPoint
from syncdeco._plane import watch
from syncdeco._plane.deadline import Deadline
from syncdeco._plane.exchange import Exchange, Place
from syncdeco._plane.tier import host_store, join_store
from syncdeco._plane.transport import Keys

# This machine's resolver stalls a new connection 5 s now and then (a reverse
# lookup of 127.0.0.1 that no name server answers): give up after 1 s.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")

WORLD = 32
NODE = 4
TIMEOUT = 60.0  # a sync point that should succeed


class Counted:
    """A store connection that counts the requests made through it."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)

        return call

    def clone(self) -> Counted:
        return Counted(self.store.clone())


class Job:
    """WORLD ranks as threads, each with its own exchange over one job store."""

    def __init__(self, world: int = WORLD, node: int = NODE) -> None:
        self.server = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True
        )
        port = self.server.port
        self.stores = [
            Counted(
                dist.TCPStore(  # type: ignore[attr-defined]
                    "127.0.0.1",
                    port,
                    is_master=False,
                    wait_for_workers=False,
                    timeout=timedelta(seconds=30),
                )
            )
            for _ in range(world)
        ]
        self.world = world
        self.exchanges = [
            Exchange(
                self.stores[r],
                r,
                world,
                Place(f"n{r // node}", r % node, node),
                spare=self.stores[r].clone(),
                broadcast=_no_tensors,
                wire_device=lambda: torch.device("cpu"),
                transport=Keys,
                prefix="tier-test",
            )
            for r in range(world)
        ]

    def run(
        self, body: Callable[[int, Exchange], object], ranks: range | None = None
    ) -> dict[int, object]:
        """``body(rank, exchange)`` on a thread per rank: what each returned
        or raised."""
        out: dict[int, object] = {}

        def one(rank: int) -> None:
            try:
                out[rank] = body(rank, self.exchanges[rank])
            except BaseException as exc:
                out[rank] = exc

        threads = [
            threading.Thread(target=one, args=(r,), daemon=True)
            for r in (ranks if ranks is not None else range(self.world))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a simulated rank did not finish in 120 s"
        return out

    def barriers(self, n: int, name: str = "step") -> None:
        """``n`` world sync points that all succeed."""

        def body(rank: int, ex: Exchange) -> object:
            for _ in range(n):
                ex.sync(point(ex, name), False, None, None, TIMEOUT)
            return "ok"

        assert set(self.run(body).values()) == {"ok"}


def _no_tensors(tensor: Any, src: int) -> object:
    raise AssertionError("these sync points carry no tensors")


def point(ex: Exchange, name: str, local: bool = False) -> SyncPoint:
    return SyncPoint("barrier", name, ex.seq["l" if local else "w"] + 1, "tests/test_tier.py")


@pytest.fixture
def job() -> Job:
    made = Job()
    made.barriers(1, "start")  # the first world sync point: flat
    made.barriers(1, "up")  # the next: the tier comes up (connections to the node stores)
    return made


def test_after_the_first_sync_point_node_traffic_leaves_the_job_store(job: Job) -> None:
    before = sum(s.calls for s in job.stores)
    job.barriers(5)
    per_sync = (sum(s.calls for s in job.stores) - before) / 5
    ex = job.exchanges
    assert all(e.tier is not None for e in ex)
    assert ex[5].tier is not None and ex[5].tier.main == 4 and ex[5].tier.members == (5, 6, 7)
    # The ranks of node 0 and the other nodes' mains meet rank 0 on the job
    # store; the other ranks go through their node's store.
    assert ex[0].tier is not None and ex[0].tier.slots == (1, 2, 3, *range(4, WORLD, NODE))
    members_off_job = [r for r in range(WORLD) if r >= NODE and r % NODE]
    for r in members_off_job:
        assert job.stores[r].calls <= 12  # its few startup requests, none per sync point
    # The flat design costs about 5 requests a rank a sync point on the job's store.
    assert per_sync < 5 * (WORLD // NODE + NODE)


def test_a_failure_on_a_node_reaches_every_rank(job: Job) -> None:
    def body(rank: int, ex: Exchange) -> object:
        failure = None
        if rank == 13:
            failure = Failure.from_exception(13, ValueError("bad shard 13"))
        return ex.sync(point(ex, "load"), False, failure, None, TIMEOUT)

    out = job.run(body)
    assert out[13] is None  # its own failure: it re-raises its own error
    for r, got in out.items():
        if r != 13:
            assert isinstance(got, PeerFailedError), (r, got)
            assert got.rank == 13 and "bad shard 13" in str(got)


@pytest.mark.parametrize("odd", [22, 20], ids=["member", "node-main"])
def test_a_mismatch_on_a_node_reaches_every_rank(job: Job, odd: int) -> None:
    """Rank ``odd`` (a member of node 5, or its main) reaches another sync
    point: every rank hears who was where, rank by rank (a node's ranks
    travel to rank 0 in groups)."""

    def body(rank: int, ex: Exchange) -> object:
        return ex.sync(point(ex, "other" if rank == odd else "save"), False, None, None, TIMEOUT)

    out = job.run(body)
    for r, got in out.items():
        assert isinstance(got, SyncMismatchError), (r, got)
        where = {desc.split("'")[1]: ranks for desc, ranks in got.points.items()}
        assert where == {"save": tuple(x for x in range(WORLD) if x != odd), "other": (odd,)}


@pytest.mark.parametrize("late", [9, 8, 0], ids=["member", "node-main", "rank-0"])
def test_a_missing_rank_is_named_by_every_rank(job: Job, late: int) -> None:
    """Rank ``late`` never comes: every other rank raises SyncTimeoutError
    naming it (a member of node 2, node 2's main, or rank 0)."""
    came = [r for r in range(WORLD) if r != late]

    def body(rank: int, ex: Exchange) -> object:
        return ex.sync(point(ex, "late"), False, None, None, 1.0)

    start = time.monotonic()
    out = job.run(body, came)  # type: ignore[arg-type]
    took = time.monotonic() - start
    for r in came:
        got = out[r]
        assert isinstance(got, SyncTimeoutError), (r, got)
        assert got.missing == (late,), (r, got.missing)
        # (with rank 0 late, each node's main gives up on it in _relay: the
        # user's traceback holds the timeout alone, not syncdeco's Late)
        assert got.__context__ is None, (r, repr(got.__context__))
    assert took < 60  # bounded (speed is not asserted: the machine is shared)


@pytest.mark.parametrize("leaver", [10, 8, 1], ids=["member", "node-main", "rank-0-node"])
def test_a_rank_that_exits_is_named_at_once(job: Job, leaver: int) -> None:
    """A rank's process ends (its exit notice, as at interpreter exit) while
    the others wait with no timeout: every rank raises RankExitedError."""
    job.exchanges[leaver].leave(Failure(leaver, "SystemExit", "0", "", True, False))
    came = [r for r in range(WORLD) if r != leaver]

    def body(rank: int, ex: Exchange) -> object:
        return ex.sync(point(ex, "after"), False, None, None, None)

    out = job.run(body, came)  # type: ignore[arg-type]
    for r in came:
        got = out[r]
        assert isinstance(got, RankExitedError), (r, got)
        assert got.rank == leaver


def test_local_sync_points_stay_on_the_node(job: Job) -> None:
    before = [s.calls for s in job.stores]

    def body(rank: int, ex: Exchange) -> object:
        return [ex.sync(point(ex, "node", True), True, None, None, TIMEOUT) for _ in range(3)]

    out = job.run(body)
    assert all(v == [None] * 3 for v in out.values()), out
    assert [s.calls for s in job.stores] == before  # not one request to the job's store


def test_a_node_main_that_waits_on_its_nodes_store_logs_who_came(
    job: Job, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher's warning for a local sync point looks on the node's
    store, where the node's ranks send their frames (not the job's)."""
    main, came, late = 4, (5, 6), 7  # the second node
    ex = job.exchanges
    out: dict[int, object] = {}

    def local(rank: int) -> None:
        out[rank] = ex[rank].sync(point(ex[rank], "node", True), True, None, None, TIMEOUT)

    threads = [threading.Thread(target=local, args=(r,), daemon=True) for r in (main, *came)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30  # until the main waits and both frames are sent
    while not all(ex[r].waiting is not None for r in (main, *came)):
        assert time.monotonic() < deadline, "the node's ranks did not reach the sync point"
        time.sleep(0.005)
    wait = ex[main].waiting
    assert wait is not None
    with caplog.at_level(logging.WARNING, logger="syncdeco"):
        watch.warn(ex[main], wait, 1.0)
    (record,) = [r for r in caplog.records if "has waited" in r.getMessage()]
    assert "arrived 5, 6; missing 7" in record.getMessage(), record.getMessage()
    threads.append(threading.Thread(target=local, args=(late,), daemon=True))
    threads[-1].start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert out == {r: None for r in (main, *came, late)}, out


def test_a_mains_claims_are_deleted_once_its_members_had_the_verdict() -> None:
    """A main answering a member close to its deadline claims the answer
    first (a key per member); once the member is at the next sync point,
    the key goes: a loop of sync points near their timeout leaves none."""
    two = Job(world=2, node=2)  # one node: no tier, one store
    ex = two.exchanges
    claim = "tier-test/w/0/claim/1/1"
    out: dict[int, object] = {}

    def member() -> None:
        try:
            out[1] = ex[1].sync(point(ex[1], "near"), False, None, None, 0.01)
        except SyncTimeoutError as exc:  # the main came after its grace
            out[1] = exc

    started = time.monotonic()
    thread = threading.Thread(target=member, daemon=True)
    thread.start()
    # Past its timeout, into its grace (two seconds: GRACE and STACK_WAIT),
    # within WITHDRAW_MARGIN (one second) of its end: the main asks.
    while ex[1].waiting is None or time.monotonic() < started + 1.1:
        assert time.monotonic() < started + 30, "rank 1 did not reach the sync point"
        time.sleep(0.001)
    out[0] = ex[0].sync(point(ex[0], "near"), False, None, None, TIMEOUT)
    thread.join(30)
    assert not thread.is_alive()
    # In its grace period: both met; after it, both heard of the withdrawal.
    assert out == {0: None, 1: None} or all(
        isinstance(v, SyncTimeoutError) for v in out.values()
    ), out
    assert two.stores[0].store.check([claim])
    two.barriers(1, "next")
    assert not two.stores[0].store.check([claim])


@pytest.mark.parametrize("known", [True, False])
def test_ranks_that_never_start_are_named_by_the_launchers_layout(known: bool) -> None:
    """Before the tier: a first sync point with ``local=True`` finds the
    node's ranks on the job's store.  Under srun's cyclic layout (nodes
    n0 = ranks 0, 2 and n1 = ranks 1, 3), with ranks 1 and 2 never started,
    rank 3 names its node's main, rank 1, and rank 0 its member, rank 2;
    where the launcher gave no layout, every rank that has not started."""
    job = Job(world=4, node=2)  # (its exchanges: a flat layout, not used here)
    layout = {"n0": (0, 2), "n1": (1, 3)}
    ex = {
        r: Exchange(
            job.stores[r],
            r,
            4,
            Place(node, layout[node].index(r), 2, layout[node] if known else None),
            spare=job.stores[r].clone(),
            broadcast=_no_tensors,
            wire_device=lambda: torch.device("cpu"),
            prefix="cyclic",
            tiers=False,
        )
        for r, node in ((0, "n0"), (3, "n1"))
    }
    out = job.run(
        lambda r, _: ex[r].sync(point(ex[r], "load", True), True, None, None, 0.5), range(0, 4, 3)
    )
    assert all(isinstance(e, SyncTimeoutError) for e in out.values()), out
    errors = cast("dict[int, SyncTimeoutError]", out)
    assert errors[3].missing == ((1,) if known else (1, 2))
    assert errors[0].missing == ((2,) if known else (1, 2))
    assert "[finding this node's ranks: local rank(s) 0 of n1]" in str(errors[3])
    assert "[finding this node's ranks: local rank(s) 1 of n0]" in str(errors[0])
    assert "(never seen at a sync point)" in str(errors[3])


def test_ranks_that_come_as_the_wait_ends_are_not_named() -> None:
    """The wait for a node's ranks ends; they come while it looks at who is
    missing: no timeout (naming nobody, or a rank that came)."""
    job = Job(world=2, node=2)
    ex, key = job.exchanges[0], "cyclic/late"

    def came(absent: list[int]) -> tuple[list[int], str]:
        job.stores[1].set(key, b"1")  # rank 1 comes now
        return [1], ": local rank(s) 1 of n0"

    ex._wait_keys([key], came, Deadline.after(0.01), point(ex, "load", True))
    job.stores[1].delete_key(key)
    with pytest.raises(SyncTimeoutError) as info:
        ex._wait_keys([key], lambda absent: ([1], ""), Deadline.after(0.01), point(ex, "x"))
    assert info.value.missing == (1,)


def test_a_member_that_gives_up_raises_without_the_wait_behind_it() -> None:
    """The user's traceback shows the timeout alone: not syncdeco's own
    ``Late`` as the exception it happened while handling."""
    two = Job(world=2, node=2)
    ex = two.exchanges[1]
    with pytest.raises(SyncTimeoutError) as info:
        ex.sync(point(ex, "alone"), False, None, None, 0.05)  # rank 0 never comes
    assert info.value.missing == (0,)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_a_result_reaches_every_node(job: Job) -> None:
    def body(rank: int, ex: Exchange) -> object:
        payload = {"vocab": 32000} if rank == 0 else None
        return ex.sync(point(ex, "tokenizer"), False, None, payload, TIMEOUT)

    out = job.run(body)
    assert all(v == {"vocab": 32000} for v in out.values()), out


# -- real processes: two torchrun agents as two nodes of two ranks ---------------------

TIERS = Path(__file__).parent / "scripts" / "tiers.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("victim", [3, 2], ids=["node-member", "node-main"])
def test_two_torchrun_nodes_sync_through_their_stores(tmp_path: Path, victim: int) -> None:
    """Every promise holds through the node tier, and a rank SIGKILLed
    there (a node's member, or a node's main, which takes its node's store
    with it) is named by every survivor within 5 s under a slow monitor."""
    port = _free_port()
    agents = [
        start_script([
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--monitor-interval", "600",
            str(TIERS), str(tmp_path), str(victim),
        ], {"SYNCDECO_FAIL_FAST": "0"})  # a survivor between sync points hears at its next
        for node in (0, 1)
    ]  # fmt: skip
    # The agents notice their workers ended only at their next look (ten
    # minutes): stop reading once every survivor has spoken.
    survivors = [r for r in range(4) if r != victim]

    def named(lines: list[str]) -> bool:
        return sum(ln.startswith("[rank ") and " named " in ln for ln in lines) >= 3

    lines = read_until(agents, named, 180)
    log = "".join(lines)
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    # Node 1 (ranks 2 and 3) meets rank 0 through rank 2, its main.
    assert [f["tier"] for f in facts] == [
        [0, [1], [1, 2]],
        [0, [1], [1, 2]],
        [2, [3], [1, 2]],
        [2, [3], [1, 2]],
    ], log
    assert all(f["result"] == {"size": 32000} for f in facts), log
    assert [f["node_first"] for f in facts] == [True, False, True, False], log
    assert [f["failure"] for f in facts] == [
        ["PeerFailedError", 3],
        ["PeerFailedError", 3],
        ["PeerFailedError", 3],
        ["own", "shard 3 is corrupt"],
    ], log
    for rank in survivors:
        (line,) = [ln for ln in log.splitlines() if ln.startswith(f"[rank {rank}] named ")]
        assert line.startswith(f"[rank {rank}] named rank {victim} within "), log
        took = float(line.split(" within ", 1)[1].split("s:", 1)[0])
        assert took < 5, log
        assert "its process ended without running Python's exit handlers" in line, log


# -- what a node's store listens on ------------------------------------------------------


def test_a_nodes_store_listens_on_loopback_only() -> None:
    # Only its node connects, and what it carries is unpickled: no other
    # host may reach it (a c10d TCPStore server alone binds every interface).
    store, port = host_store()
    try:
        assert [(a, p) for a, p in listening() if p == port] == [("127.0.0.1", port)]
        member = join_store(port)
        member.set("k", b"v")
        assert store.get("k") == b"v"
    finally:
        del store
    assert port not in [p for _, p in listening()]  # the server closed its socket


def test_a_node_that_waits_for_a_late_node_prints_nothing(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Two nodes of two ranks; rank 0's node comes 10 s late (more than two
    of the waiting node's 4 s looks at the job's store): the waiting ranks'
    store waits never time out early, so torch's store client logs nothing
    ("waitForInput ... timed out"), and the sync point succeeds."""
    job = Job(world=4, node=2)
    job.barriers(2)  # the tier comes up at the second
    capfd.readouterr()

    def body(rank: int, ex: Exchange) -> object:
        if rank in (0, 1):
            time.sleep(10.0)  # the late node: the scenario itself, not an ordering
        return ex.sync(point(ex, "late node"), False, None, None, TIMEOUT)

    out = job.run(body)
    assert out == dict.fromkeys(range(4)), out
    assert all(e.tier is not None for e in job.exchanges)
    err = capfd.readouterr().err
    assert "waitForInput" not in err and "timed out" not in err, err
