"""The rules of the node leases (syncdeco._plane.lease), with plain values.

No store, no clock, no process: a watcher's looks are (time, values) pairs.
The real-process side (a pulse per node, a lost node named by the
survivors) is in test_multinode.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from syncdeco._plane import lease
from syncdeco._plane.lease import LOOK, LOST_AFTER, PERIOD, STALL, Leases


def renewals(until: float, *, every: float = PERIOD, stop: float | None = None) -> list[float]:
    """When a pulse's renewals reach the store: every ``every`` s, until ``stop``."""
    out, t = [], 0.0
    while t <= until and (stop is None or t < stop):
        out.append(t)
        t += every
    return out


def watch(arrivals: dict[str, list[float]], looks: list[float]) -> dict[str, float]:
    """Feed a watcher looks at ``looks``; return when each node was judged lost."""
    leases, lost = Leases(), {}
    for now in looks:
        values = {}
        for node, times in arrivals.items():
            done = [t for t in times if t <= now]
            values[node] = lease.alive(len(done), node, (1,)) if done else None
        for node in leases.look(now, values):
            lost.setdefault(node, now)
    return lost


def looks_every(step: float, until: float) -> list[float]:
    return [round(i * step, 6) for i in range(int(until / step) + 1)]


def test_a_node_whose_renewals_stop_is_lost_within_lost_after_and_a_look():
    cut = 30.0
    lost = watch({"b": renewals(60, stop=cut)}, looks_every(LOOK, 60))
    assert cut < lost["b"] <= cut + LOST_AFTER + LOOK


def test_a_node_renewing_on_time_is_never_lost():
    assert watch({"b": renewals(120)}, looks_every(LOOK, 120)) == {}


@given(start=st.floats(0, 30), delay=st.floats(0, 6.2))
def test_renewals_held_up_by_a_few_seconds_of_packet_loss_are_no_loss(start, delay):
    # A 3 s outage holds a renewal up to about 6.2 s in TCP's retransmission
    # backoff: the renewals sent meanwhile arrive together when it heals.
    times = [t if not start <= t < start + delay else start + delay for t in renewals(90)]
    assert watch({"b": times}, looks_every(LOOK, 90)) == {}


@given(start=st.floats(0, 60), length=st.floats(STALL + 0.01, 120))
def test_a_watcher_that_stalled_starts_over_instead_of_blaming_the_nodes(start, length):
    # The watcher's own thread stood still (its rank held the GIL): no look
    # for ``length`` seconds.  The nodes renewed all along.
    looks = [t for t in looks_every(LOOK, 200) if not start < t < start + length]
    assert watch({"b": renewals(200), "c": renewals(200)}, looks) == {}


def test_a_node_without_a_lease_yet_is_not_judged():
    leases = Leases()
    for now in looks_every(LOOK, 60):
        assert leases.look(now, {"b": None}) == []


def test_a_node_whose_ranks_ended_is_not_judged_lost():
    leases = Leases()
    value = lease.ended("nodeB", (2, 3))
    for now in looks_every(LOOK, 60):
        assert leases.look(now, {"b": value}) == []


def test_each_node_is_judged_on_its_own():
    lost = watch(
        {"b": renewals(60, stop=10), "c": renewals(60), "d": renewals(60, stop=20)},
        looks_every(LOOK, 60),
    )
    assert sorted(lost) == ["b", "d"]
    assert lost["b"] < lost["d"]


@given(
    count=st.integers(0, 10**9),
    host=st.from_regex(r"[a-z][a-z0-9.-]{0,40}", fullmatch=True),
    ranks=st.lists(st.integers(0, 100_000), unique=True, max_size=64),
)
def test_a_lease_reads_back_what_it_says(count, host, ranks):
    assert lease.read(lease.alive(count, host, ranks)) == lease.Reading(
        host, tuple(sorted(ranks)), False
    )
    assert lease.read(lease.ended(host, ranks)) == lease.Reading(host, tuple(sorted(ranks)), True)


def test_the_numbers_leave_room_for_the_false_alarms_and_the_bound():
    # A 3 s outage can hold a lease still for a period plus ~6.2 s of
    # backoff; the loss must still be named within 10 s of it.
    assert PERIOD + 6.2 < LOST_AFTER
    assert LOST_AFTER + LOOK <= 9.5
    assert LOOK < STALL
