"""The sync protocol's core (``frames``, ``deadline``, ``protocol``), driven
with plain values: no store, no process, no thread.  Every rule the
exchange asks the core about is here, with Hypothesis property tests over
random node layouts, arrivals, failures, exits, withdrawals and deadlines.
The exchange's I/O (real stores and threads, and real processes) is tested
in test_tier.py, test_ranks.py, test_exits.py and test_faults.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncdeco import (
    PeerFailedError,
    RankExitedError,
    RankKilledError,
    RankLostError,
    SyncMismatchError,
    SyncTimeoutError,
)
from syncdeco._backend import Failure, SyncPoint
from syncdeco._plane import protocol
from syncdeco._plane.deadline import GRACE, NEVER, STACK_WAIT, Deadline, look_until
from syncdeco._plane.frames import (
    Agreed,
    Failed,
    Frame,
    Mismatch,
    NodeFrame,
    Ok,
    Timeout,
    Verdict,
    dump_failure,
    dump_frame,
    dump_verdict,
    load_failure,
    load_frame,
    load_verdict,
)
from syncdeco._plane.protocol import (
    ALONE,
    FALLBACK,
    MAIN,
    MEMBER,
    NODE_MAIN,
    NODE_MEMBER,
    Layout,
    Route,
    route,
)

STEP = SyncPoint("barrier", "step", 1, "train.py:10")
OTHER = SyncPoint("barrier", "save", 1, "train.py:20")
NOW = 1_000.0  # a wall-clock time, for give_up
settings.register_profile("core", max_examples=100, deadline=None, database=None)
settings.load_profile("core")


def failure(rank: int, *, exited: bool = False, killed: bool = False) -> Failure:
    return Failure(rank, "ValueError", f"bad shard {rank}", "Traceback ...", exited, killed)


# -- the codec -------------------------------------------------------------------------

failures = st.builds(
    Failure,
    st.integers(0, 64),
    st.text(max_size=8),
    st.text(max_size=8),
    st.text(max_size=8),
    st.booleans(),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.integers(0, 64), max_size=3).map(tuple),
)
give_ups = st.none() | st.floats(0, 1e9, allow_nan=False)
frames = st.builds(
    Frame,
    st.integers(1, 99),
    st.integers(0, 64),
    st.sampled_from(["barrier", "main_first", "exit", "absent"]),
    st.text(max_size=8),
    st.integers(0, 9),
    st.none() | failures,
    st.text(max_size=12),
    give_ups,
)
verdicts = st.one_of(
    st.builds(Ok, st.integers(1, 99), st.none() | st.binary(max_size=8)),
    st.builds(Failed, st.integers(1, 99), failures, st.none() | st.text(max_size=8)),
    st.builds(
        Mismatch,
        st.integers(1, 99),
        st.dictionaries(st.text(max_size=8), st.lists(st.integers(0, 9)).map(tuple)),
    ),
    st.builds(
        Timeout,
        st.integers(1, 99),
        st.lists(st.integers(0, 64), min_size=1).map(tuple),
        st.dictionaries(st.integers(0, 64), st.none() | st.text(max_size=8)),
        st.dictionaries(st.integers(0, 64), st.tuples(st.text(max_size=4), st.text(max_size=4))),
    ),
)


@given(frames)
def test_a_frame_travels_unchanged(frame: Frame) -> None:
    assert load_frame(dump_frame(frame)) == frame


@given(verdicts)
def test_a_verdict_travels_unchanged(verdict: Verdict) -> None:
    assert load_verdict(dump_verdict(verdict)) == verdict


@given(failures)
def test_an_exit_record_travels_unchanged(f: Failure) -> None:
    assert load_failure(dump_failure(f)) == f


@given(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=6), st.data())
def test_a_node_frame_groups_the_frames_that_agree(wheres: list[str], data: st.DataObject) -> None:
    """A node's main sends rank 0 its node's frames that agree with its own
    as one group per place, the others as they are; nothing is lost."""
    odd = data.draw(st.sets(st.integers(1, len(wheres) - 1))) if len(wheres) > 1 else set()
    node = []
    for r, where in enumerate(wheres):
        point = OTHER if r in odd else STEP
        node.append(Frame(1, 8 + r, point.kind, point.name, 1, None, where, NOW + r))
    sent = load_frame(dump_frame(NodeFrame.of(node, (20,), {20: "step, 3s ago"})))
    assert isinstance(sent, NodeFrame)
    arrived, missing, told, groups = protocol.gathered([sent])
    assert missing == [20] and told == {20: "step, 3s ago"}
    grouped = [r for g in groups for r in g.ranks]
    assert sorted([*arrived, *grouped]) == [8 + r for r in range(len(wheres))]
    assert set(arrived) == {8 + r for r in odd}  # the odd ones travel as they are
    assert len(groups) == len({w for r, w in enumerate(wheres) if r not in odd})


def test_a_verdict_of_unknown_kind_is_refused() -> None:
    import pickle

    with pytest.raises(ValueError, match="unknown kind 7"):
        load_verdict(pickle.dumps((7, 1)))


# -- deadlines ---------------------------------------------------------------------------


def test_a_deadline_counts_down_from_its_start() -> None:
    d = Deadline.after(10.0, now=100.0)
    assert d == Deadline(110.0, 10.0)
    assert d.left(now=104.0) == 6.0 and d.left(now=120.0) == 0.0
    assert not d.passed(now=109.9) and d.passed(now=110.0)
    assert d.wall(now=104.0, wall_now=5000.0) == 5006.0


def test_no_timeout_never_ends() -> None:
    assert Deadline.after(None) is NEVER
    assert NEVER.left() is None and not NEVER.passed(now=1e12) and NEVER.wall() is None
    assert NEVER.extended(2) is NEVER and NEVER.early() is NEVER and NEVER.then() is NEVER


@pytest.mark.parametrize(
    ("timeout", "grace"), [(1.0, GRACE), (30.0, 3.0), (600.0, 10 * GRACE)], ids=str
)
def test_a_member_waits_a_grace_longer_per_tier_above_it(timeout: float, grace: float) -> None:
    """A tenth of the timeout, between 1 and 10 s, plus the second its main
    takes to ask the missing ranks for their stacks."""
    d = Deadline.after(timeout, now=0.0)
    assert d.extended(0) == d
    assert d.extended(1).at == timeout + grace + STACK_WAIT
    assert d.extended(2).at == timeout + 2 * (grace + STACK_WAIT)
    assert d.extended(1).timeout == timeout  # messages name the sync point's own


@pytest.mark.parametrize(("timeout", "early"), [(2.0, 0.5), (30.0, GRACE)], ids=str)
def test_a_node_main_stops_gathering_before_rank_0s_deadline(timeout: float, early: float) -> None:
    assert Deadline.after(timeout, now=0.0).early().at == timeout - early


def test_what_follows_a_verdict_gets_the_timeout_again() -> None:
    assert Deadline.after(5.0, now=0.0).then(now=7.0) == Deadline(12.0, 5.0)


@given(
    st.floats(0.01, 1e4),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_a_lower_tier_never_gives_up_first(timeout: float, low: int, high: int) -> None:
    d = Deadline.after(timeout, now=0.0)
    lo, hi = sorted((low, high))
    assert d.early().at <= d.at <= d.extended(lo).at <= d.extended(hi).at  # type: ignore[operator]


# -- routes ------------------------------------------------------------------------------


def layouts(sizes: Sequence[int]) -> dict[int, Layout]:
    """Each rank's view of the tier over nodes of ``sizes`` ranks, numbered
    in a row (as torchrun does)."""
    nodes, start = [], 0
    for size in sizes:
        nodes.append(list(range(start, start + size)))
        start += size
    zero = tuple(nodes[0])
    slots = tuple(sorted({*zero, *(n[0] for n in nodes[1:])} - {0}))
    return {r: Layout(n[0], tuple(n[1:]), slots, zero) for n in nodes for r in n}


def test_routes_of_a_flat_world() -> None:
    assert route(0, 4, False) == Route(MAIN, "w", 0, (1, 2, 3))
    assert route(2, 4, False) == Route(MEMBER, "w", 0, (), 1)
    assert route(0, 1, False) == Route(ALONE, "w", 0)
    assert route(0, 1, True) == Route(ALONE, "w", 0)  # a world of one has no node scope


def test_routes_of_a_node_scope() -> None:
    assert route(4, 8, True, node=(4, (5, 6, 7))) == Route(MAIN, "l", 4, (5, 6, 7))
    assert route(5, 8, True, node=(4, ())) == Route(MEMBER, "l", 4, (), 1)
    assert route(4, 8, True, node=(4, ())) == Route(ALONE, "l", 4)
    with pytest.raises(ValueError, match="needs this rank's node"):
        route(5, 8, True)


def test_routes_through_the_node_tier() -> None:
    lay = layouts([2, 3, 1])  # ranks 0-1, 2-4, 5
    assert route(0, 6, False, layout=lay[0]) == Route(MAIN, "w", 0, (1, 2, 5))
    assert route(1, 6, False, layout=lay[1]) == Route(MEMBER, "w", 0, (), 1)
    assert route(2, 6, False, layout=lay[2]) == Route(NODE_MAIN, "w", 0, (3, 4), 1)
    assert route(3, 6, False, layout=lay[3]) == Route(NODE_MEMBER, "w", 2, (), 2)
    assert route(3, 6, False, layout=lay[3], reachable=False) == Route(FALLBACK, "w", 2, (), 2)
    assert route(5, 6, False, layout=lay[5]) == Route(NODE_MAIN, "w", 0, (), 1)  # a node of one


@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.booleans())
def test_no_layout_leaves_a_rank_without_a_route(sizes: list[int], tiered: bool) -> None:
    """Every rank but 0 reaches rank 0: directly, or through exactly one
    node main that waits for it; every main waits for exactly its own."""
    world = sum(sizes)
    lay = layouts(sizes) if tiered and sizes[0] > 1 else {}
    routes = {r: route(r, world, False, layout=lay.get(r)) for r in range(world)}
    zero = routes[0]
    assert zero.kind == (ALONE if world == 1 else MAIN)
    reached = set(zero.members)
    for r, way in routes.items():
        if way.kind == NODE_MEMBER:
            node_main = routes[way.main]
            assert node_main.kind == NODE_MAIN and r in node_main.members
            assert way.main in zero.members
            reached.add(r)
        elif way.kind in (MEMBER, NODE_MAIN):
            assert way.main == 0 and r in zero.members
        if way.kind == NODE_MAIN:
            assert all(routes[m].main == r for m in way.members)
    assert reached == set(range(1, world))
    # Each tier below rank 0 adds a grace: rank 0 gives up first.
    assert all(way.tiers == {MAIN: 0, ALONE: 0}.get(way.kind, way.tiers) for way in routes.values())


# -- naming a node's ranks before they have started -------------------------------------


def test_a_node_names_its_absent_ranks_by_the_launchers_layout() -> None:
    cyclic = (1, 3, 5, 7)  # node 1 of 2, 8 ranks dealt in turn: local rank 0 is rank 1
    started = {0, 2, 3, 4, 6, 7}.__contains__
    assert protocol.not_started(cyclic, [0, 2], started, 8) == [1, 5]
    # Where the launcher does not say, every rank that has not started.
    assert protocol.not_started(None, [0], started, 8) == [1, 5]
    # A layout that one of its ranks contradicts (rank 3 has started, so it
    # is not the missing local rank 1): not trusted.
    assert protocol.not_started((2, 3), [1], started, 8) == [1, 5]
    assert protocol.not_started((2,), [1], started, 8) == [1, 5]  # too short for it


@given(st.integers(1, 64), st.data())
def test_the_ranks_named_never_include_one_that_started(world: int, data: st.DataObject) -> None:
    started = set(data.draw(st.sets(st.integers(0, world - 1))))
    layout = data.draw(st.none() | st.lists(st.integers(0, world - 1), min_size=1, max_size=8))
    absent = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=4))
    named = protocol.not_started(layout, absent, started.__contains__, world)
    assert not started & set(named)
    if layout is None or any(lr >= len(layout) for lr in absent):
        assert named == sorted(set(range(world)) - started)


# -- ranks already gone ------------------------------------------------------------------


def test_a_member_whose_main_is_gone_does_not_wait() -> None:
    gone = {4: failure(4, exited=True)}
    assert protocol.main_gone(Route(MEMBER, "l", 4, (), 1), gone, 7) == Failed(7, gone[4])
    assert protocol.main_gone(Route(NODE_MEMBER, "w", 4, (), 2), gone, 7) == Failed(7, gone[4])
    assert protocol.main_gone(Route(MEMBER, "w", 0, (), 1), gone, 7) is None
    assert protocol.main_gone(Route(NODE_MAIN, "w", 0, (4,), 1), gone, 7) is None


def test_a_main_answers_at_once_for_gone_members() -> None:
    gone = {2: failure(2, exited=True), 9: failure(9, exited=True)}
    world = protocol.gone_frames(Route(MAIN, "w", 0, (1, 2)), 0, gone, 3)
    assert set(world) == {2, 9}  # the world's main hears of every rank's exit
    assert world[9] == Frame.exit(3, gone[9]) and world[9].kind == "exit"
    node = protocol.gone_frames(Route(NODE_MAIN, "w", 0, (5, 9)), 4, gone, 3)
    assert set(node) == {9}  # a node's main: its own members only
    assert protocol.gone_frames(Route(MAIN, "l", 4, (5,)), 4, gone, 3) == {}


def test_which_verdict_marks_a_rank_gone() -> None:
    exit2 = Failed(1, failure(2, exited=True))
    assert protocol.marks_gone(exit2, 2, tiered_world=False) == 2  # its main
    assert protocol.marks_gone(exit2, 0, tiered_world=False) is None  # rank 0 will say so
    assert protocol.marks_gone(exit2, 0, tiered_world=True) == 2  # only rank 0 says so
    assert protocol.marks_gone(Failed(1, failure(2)), 2, tiered_world=True) is None  # it raised
    assert protocol.marks_gone(Timeout(1, (2,)), 2, tiered_world=True) is None
    assert protocol.noted(Frame.exit(1, failure(3, exited=True))) == failure(3, exited=True)
    assert protocol.noted(Frame.stand_in(1, 3, gone=2)) is None


# -- the verdict -------------------------------------------------------------------------


def judge(
    arrived: Mapping[int, Frame],
    missing: Sequence[int] = (),
    own: Failure | None = None,
    agreed: Sequence[Agreed] = (),
) -> Verdict | None:
    return protocol.judge(1, STEP, 0, own, arrived, missing, {}, None, agreed)


def at(rank: int, point: SyncPoint = STEP, f: Failure | None = None) -> Frame:
    return Frame.of(1, rank, point, f, None)


def test_all_well_is_no_verdict() -> None:
    assert judge({1: at(1), 2: at(2)}) is None
    assert judge({}, agreed=[Agreed.of([at(1), at(2)])]) is None


def test_an_exit_explains_the_missing() -> None:
    gone = failure(3, exited=True)
    v = judge({3: Frame.exit(1, gone), 1: at(1, f=failure(1))}, missing=(2,))
    assert v == Failed(1, gone, None)  # not a timeout, nor rank 1's failure


def test_missing_ranks_come_before_a_failure() -> None:
    assert judge({1: at(1, f=failure(1))}, missing=(2, 5)) == Timeout(1, (2, 5))


def test_a_failure_wins_over_a_mismatch_and_the_lowest_rank_is_named() -> None:
    v = judge({1: at(1, OTHER), 3: at(3, f=failure(3)), 2: at(2, OTHER, failure(2))})
    assert v == Failed(1, failure(2), OTHER.describe())
    assert judge({1: at(1)}, own=failure(0)) == Failed(1, failure(0), STEP.describe())


def test_a_mismatch_names_who_came_where() -> None:
    late = Frame(2, 3, "barrier", "step", 2, None, "step (call 2)", None)
    v = judge({1: at(1, OTHER), 3: late}, agreed=[Agreed.of([at(4), at(5)])])
    assert v == Mismatch(
        1,
        {
            STEP.describe(): (0, 4, 5),
            OTHER.describe(): (1,),
            "step (call 2) [its sync #2, this is #1]": (3,),
        },
    )


def test_rank_0_asks_only_the_ranks_near_their_deadline() -> None:
    """(Moved down from test_tier.py.)  A rank that reached its deadline may
    have withdrawn; rank 0, answering that late, asks each rank near its
    deadline, whether its frame came alone or in its node's group."""
    node = [Frame.of(1, r, STEP, None, NOW + 600 if r == 9 else NOW) for r in (8, 9, 10, 11)]
    alone = {1: Frame.of(1, 1, STEP, None, NOW + 600), 2: Frame.of(1, 2, STEP, None, None)}
    asked = protocol.to_ask(alone, [Agreed.of(node)], NOW, margin=1.0)
    assert asked == [8, 10, 11]  # not 1 or 9 (far), nor 2 (waits forever)
    assert protocol.to_ask(alone, [Agreed.of(node)], NOW - 5, margin=1.0) == []


@given(verdicts)
def test_a_withdrawal_turns_any_verdict_into_the_main_coming_too_late(v: Verdict) -> None:
    assert protocol.withdrawal(v, False, 0) == v
    late = protocol.withdrawal(v, True, 0)
    assert late == (v if isinstance(v, Timeout) else Timeout(v.seq, (0,)))


# -- who waits for a rank ----------------------------------------------------------------


def test_who_waits_for_a_rank_without_the_tier() -> None:
    assert protocol.waiters(3, 4, None, None) == [("job", "w", 0, range(1, 4), 3)]
    assert protocol.waiters(3, 4, None, 2)[1] == ("job", "l", 2, range(0), 3)


def test_who_waits_for_a_rank_with_the_tier() -> None:
    lay = layouts([2, 3])  # 0-1, 2-4
    assert protocol.waiters(3, 5, lay[3], 2) == [
        ("job", "w", 0, (1, 2), 2),  # rank 0 waits for its node's frame
        ("node", "w", 2, (2, 3, 4), 3),
        ("node", "l", 2, (2, 3, 4), 3),
    ]
    assert protocol.waiters(2, 5, lay[2], 2) == [
        ("job", "w", 0, (1, 2), 2),
        ("node", "l", 2, (2, 3, 4), 2),
        ("node", "w", 2, (2, 3, 4), 2),  # its node waits for its relay
    ]
    assert protocol.waiters_elsewhere(3, 5, lay[0], (2, 3, 4)) == [("job", "w", 0, (1, 2), 2)]
    assert protocol.waiters_elsewhere(3, 5, None, (2, 3, 4)) == [("job", "w", 0, range(1, 5), 3)]


# -- the errors verdicts mean ------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "error"),
    [
        (Failed(1, failure(2)), PeerFailedError),
        (Failed(1, failure(2, exited=True)), RankExitedError),
        (Failed(1, failure(2, exited=True, killed=True)), RankKilledError),
        (
            Failed(1, Failure(2, "", "", "", True, True, "node-b", (2, 3))),
            RankLostError,
        ),
        (Mismatch(1, {"a": (0,), "b": (1,)}), SyncMismatchError),
        (Timeout(1, (2,), {2: "step, 3s ago"}, {2: ("in read_shard", "stack")}), SyncTimeoutError),
    ],
    ids=lambda x: type(x).__name__,
)
def test_each_verdict_raises_its_error(verdict: Verdict, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        protocol.raise_for(verdict, STEP, 1, 5.0)
    assert "rank 1" in str(raised.value)


def test_a_ranks_own_failure_and_success_raise_nothing_here() -> None:
    protocol.raise_for(Failed(1, failure(1)), STEP, 1, 5.0)  # it re-raises its own error
    protocol.raise_for(Ok(1), STEP, 1, 5.0)


# -- a world sync point, end to end, through the core alone --------------------------------

OK, ELSEWHERE, RAISES, MISSING, GONE = "ok", "elsewhere", "raises", "missing", "gone"


@dataclass(frozen=True)
class Outcome:
    verdicts: dict[int, Verdict]  # what each rank that came was told (or told itself)
    zero: Verdict | None  # rank 0's verdict, if it judged
    withdrew: set[int]  # the ranks that gave up on rank 0 before it answered


def world_sync(
    sizes: Sequence[int], tiered: bool, state: Mapping[int, str], withdrew: set[int]
) -> Outcome:
    """One world sync point as the exchange drives it, every decision taken
    by the core: frames and node frames through the codec, rank 0's verdict,
    the relay by each node's main, the look of a node's first rank at the
    job's store where its main never came, and each rank's own give-up."""
    world = sum(sizes)
    lay = layouts(sizes) if tiered else {}
    routes = {r: route(r, world, False, layout=lay.get(r)) for r in range(world)}
    seq = 1
    # Deadlines nest (a rank gives up after the main it waits for): only a
    # rank that meets rank 0 on the job's store withdraws before a relay.
    withdrew = {r for r in withdrew if routes[r].kind in (MEMBER, NODE_MAIN)}

    def gives_up(r: int) -> float:
        return NOW - 1 if r in withdrew else NOW + 600

    def frame_of(r: int) -> Frame:
        s = state[r]
        if s == GONE:
            return Frame.exit(seq, failure(r, exited=True))
        return Frame.of(
            seq,
            r,
            OTHER if s == ELSEWHERE else STEP,
            failure(r) if s == RAISES else None,
            gives_up(r),
        )

    def came(r: int) -> bool:
        return state[r] not in (MISSING, GONE)

    # Each node's main gathers its node and sends one frame (exits are in
    # the store in place of its ranks' frames).
    on_job_store: dict[int, bytes] = {}
    for r, way in routes.items():
        if way.kind == NODE_MAIN and came(r):
            node = [frame_of(r)] + [frame_of(m) for m in way.members if state[m] != MISSING]
            missing = [m for m in way.members if state[m] == MISSING]
            on_job_store[r] = dump_frame(NodeFrame.of(node, missing, {}))
        elif r != 0 and way.kind in (MEMBER, NODE_MAIN) and state[r] != MISSING:
            on_job_store[r] = dump_frame(frame_of(r))
    zero: Verdict | None = None
    if state[0] == GONE:
        zero = Failed(seq, failure(0, exited=True))  # its exit notice, as the verdict
    elif came(0) and routes[0].kind == ALONE:
        zero = Ok(seq)
    elif came(0):
        members = routes[0].members
        sent = [load_frame(on_job_store[m]) for m in members if m in on_job_store]
        arrived, missing, _, groups = protocol.gathered(sent)
        missing = [m for m in members if m not in on_job_store] + missing
        own = failure(0) if state[0] == RAISES else None
        point = OTHER if state[0] == ELSEWHERE else STEP
        zero = protocol.judge(seq, point, 0, own, arrived, missing, {}, None, groups) or Ok(seq)
        withdrawn = any(m in withdrew for m in protocol.to_ask(arrived, groups, NOW, 1.0))
        zero = protocol.withdrawal(zero, withdrawn, 0)
        zero = load_verdict(dump_verdict(zero))
    verdicts: dict[int, Verdict] = {}
    gave_up = {r: Timeout(seq, (routes[r].main,)) for r in range(world)}
    judged = came(0) and zero is not None
    for r, way in routes.items():
        if not came(r):
            continue
        if way.kind in (MAIN, ALONE):
            verdicts[r] = zero if zero is not None else Ok(seq)
        elif way.kind in (MEMBER, NODE_MAIN):
            # A rank that withdrew tells itself; the others read the verdict.
            verdicts[r] = gave_up[r] if zero is None or (r in withdrew and judged) else zero
        else:
            main = way.main
            sentinel = main + 1  # the node's first rank after its main looks at the job's store
            if state[main] == GONE:
                verdicts[r] = protocol.main_gone(way, {main: failure(main, exited=True)}, seq)  # type: ignore[assignment]
            elif came(main):
                verdicts[r] = verdicts.get(main) or (
                    gave_up[main] if zero is None or (main in withdrew and judged) else zero
                )  # relayed: the verdict, or its main's own timeout
            elif came(sentinel) and zero is not None:
                verdicts[r] = zero
            else:
                verdicts[r] = gave_up[r]
    return Outcome(verdicts, zero, withdrew)


@st.composite
def jobs(draw: st.DrawFn) -> tuple[list[int], bool, dict[int, str], set[int]]:
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    tiered = draw(st.booleans()) and sizes[0] > 1 and len(sizes) > 1
    world = sum(sizes)
    kinds = st.sampled_from([OK, OK, OK, ELSEWHERE, RAISES, MISSING, GONE])
    state = {r: draw(kinds) for r in range(world)}
    withdrew = draw(st.sets(st.sampled_from(range(world)))) if world > 1 else set()
    return sizes, tiered, state, {r for r in withdrew if r and state[r] not in (MISSING, GONE)}


def named(v: Verdict) -> set[int]:
    return set(v.missing) if isinstance(v, Timeout) else set()


@given(jobs())
def test_every_rank_reaches_the_same_verdict(
    job: tuple[list[int], bool, dict[int, str], set[int]],
) -> None:
    """Every rank that came is told rank 0's verdict, except where rank 0
    never judged (each names the rank it waited for), or its node's main
    is gone (its exit) or never came and nobody of the node could look at
    the job's store (each names its node's main, missing for rank 0 too),
    or it gave up on rank 0 that came late and timed out itself."""
    sizes, tiered, state, withdrew = job
    out = world_sync(sizes, tiered, state, withdrew)
    for r, v in out.verdicts.items():
        if out.zero is None or v == out.zero:
            continue
        assert isinstance(v, Failed | Timeout), (r, v, out.zero)
        if isinstance(v, Failed):
            assert v.gone is not None and state[v.gone] == GONE  # its node main's exit
        elif isinstance(out.zero, Timeout) and v.missing == (0,):
            pass  # it gave up on rank 0, which then timed out itself: both time out
        else:
            assert state[v.missing[0]] == MISSING, (r, v)  # its node main never came
            assert not isinstance(out.zero, Ok | Mismatch)


@given(jobs())
def test_every_missing_rank_is_named(job: tuple[list[int], bool, dict[int, str], set[int]]) -> None:
    """Where nobody exited and nobody withdrew, rank 0's verdict names every
    rank that never came: itself, or its node's main that never came."""
    sizes, tiered, state, _ = job
    if GONE in state.values() or state[0] == MISSING:
        return
    out = world_sync(sizes, tiered, state, set())
    missing = {r for r, s in state.items() if s == MISSING}
    assert out.zero is not None
    if not missing:
        assert not isinstance(out.zero, Timeout)
        return
    lay = layouts(sizes) if tiered else {}
    told = named(out.zero)
    for r in missing:
        assert r in told or (r in lay and lay[r].main in told), (r, out.zero)


@given(jobs())
def test_a_failure_always_wins_over_a_mismatch(
    job: tuple[list[int], bool, dict[int, str], set[int]],
) -> None:
    """Where every rank came and nobody exited or withdrew, a rank that
    raised is the verdict, the lowest of them, whoever came elsewhere."""
    sizes, tiered, state, _ = job
    if sum(sizes) == 1:
        return  # alone: no verdict, its own error is its own
    state = {r: s if s in (OK, ELSEWHERE, RAISES) else OK for r, s in state.items()}
    out = world_sync(sizes, tiered, state, set())
    raised = sorted(r for r, s in state.items() if s == RAISES)
    elsewhere = {OK, ELSEWHERE} <= set(state.values())
    if raised:
        assert isinstance(out.zero, Failed) and out.zero.failure.rank == raised[0]
    elif elsewhere:
        assert isinstance(out.zero, Mismatch)
    else:
        assert out.zero == Ok(1)
    assert all(v == out.zero for v in out.verdicts.values())


@given(jobs())
def test_a_withdrawal_reaches_every_rank_as_the_same_timeout(
    job: tuple[list[int], bool, dict[int, str], set[int]],
) -> None:
    sizes, tiered, state, withdrew = job
    state = {r: s if s in (OK, ELSEWHERE, RAISES) else OK for r, s in state.items()}
    out = world_sync(sizes, tiered, state, withdrew)
    if out.withdrew:
        assert out.zero == Timeout(1, (0,))
        assert all(v == Timeout(1, (0,)) for v in out.verdicts.values())


def test_a_look_until_returns_once_it_sees_it_or_its_time_is_up() -> None:
    looks: list[int] = []

    def third() -> bool:
        looks.append(1)
        return len(looks) == 3

    assert look_until(third, 5.0, first=0.001, most=0.002) and len(looks) == 3
    assert not look_until(lambda: False, 0.01, first=0.001, most=0.004)
    assert look_until(lambda: True, 0.0, first=1.0, most=1.0)  # seen at the first look
