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


# -- loss marks (a rank that ends through fail-fast marks the other nodes' leases) --------

LOSS = b'{"how": "fail-fast", "ranks": [2], "host": "nodeC", "said": "was lost"}'


def test_a_renewal_answers_with_a_mark_written_over_the_lease():
    wrote = lease.alive(5, "nodeB", (1,))
    assert lease.renewed(wrote, wrote) is None  # renewed: the store holds what it wrote
    assert lease.renewed(wrote, lease.mark(LOSS)) == LOSS
    assert lease.renewed(wrote, lease.alive(9, "nodeB", (1,))) is None  # overwritten next time
    assert lease.read(lease.mark(LOSS)) is None  # a mark names no node
    assert lease.running(wrote)
    assert not lease.running(lease.mark(LOSS)) and not lease.running(lease.ended("b", (1,)))


class _Store:
    """compare_set as the job's store answers it (the value after it)."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        if self.values.get(key) == expected:
            self.values[key] = desired
        return self.values[key]


def _pulse(store: _Store, key: str, renewals: list[float], heard: list[tuple[float, bytes]]):
    """A pulse's renewals as pulse._serve makes them, as a generator of times."""
    wrote = lease.alive(0, "nodeB", (1,))
    store.values[key] = wrote
    for count, at in enumerate(renewals, 1):
        yield at
        value = lease.alive(count, "nodeB", (1,))
        answer = store.compare_set(key, wrote, value)
        loss = lease.renewed(value, answer)
        if loss is not None:
            heard.append((at, loss))
            answer = store.compare_set(key, answer, value)
        wrote = answer


def test_a_pulse_hears_a_mark_within_a_renewal_and_writes_its_lease_back():
    for marked_at in (0.1, 3.0, 4.49, 4.5, 7.2):
        store, heard = _Store(), []
        pulse = _pulse(store, "b", renewals(30), heard)
        leases, lost = Leases(), []
        now, next_renewal, marked = 0.0, next(pulse), False
        while now <= 30:  # the watcher looks every LOOK; events between looks in time order
            while next_renewal is not None and next_renewal <= now:
                if not marked and marked_at <= next_renewal:
                    store.values["b"], marked = lease.mark(LOSS), True
                next_renewal = next(pulse, None)
            if not marked and marked_at <= now:
                store.values["b"], marked = lease.mark(LOSS), True
            lost += leases.look(now, {"b": store.values["b"]})
            now += LOOK / 4
        ((at, loss),) = heard  # heard once, with the mark's loss
        assert loss == LOSS and marked_at <= at < marked_at + PERIOD + 1e-9
        assert lease.marked(store.values["b"]) is None  # written back
        assert lost == []  # the mark, then the lease back: a node that renews is never lost


def test_a_mark_left_standing_by_a_lost_node_is_judged_like_its_lease():
    leases = Leases()
    values = [lease.alive(1, "nodeC", (2,))] * 3 + [lease.mark(LOSS)] * 20
    lost = [now for now, v in enumerate(values) if leases.look(float(now), {"c": v})]
    assert lost and lost[0] == 3 + LOST_AFTER
