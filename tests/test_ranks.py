"""syncdeco on real Gloo ranks: every behaviour that crosses processes.

A test marked ``@pytest.mark.ranks(n)`` (syncdeco's pytest plugin) runs on
every one of n ranks and asserts what that rank sees.  Where a test compares
ranks with each other, a module-level scenario runs on every rank through
``run_ranks`` and the test looks at all their outcomes.  Events are ordered
with syncdeco's own sync points or with files, never with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

import syncdeco as sd
from syncdeco.testing import run_ranks

WORLD_SIZES = [2, 4]


def on_each_world_size(test: Any) -> Any:
    """Run a ``ranks``-marked test once per world size in WORLD_SIZES."""
    params = [pytest.param(n, marks=pytest.mark.ranks(n), id=f"{n}ranks") for n in WORLD_SIZES]
    return pytest.mark.parametrize("n", params)(test)


def _mark(tmp: Path, name: str) -> None:
    (tmp / name).write_text(str(sd.rank()))


def _seen(tmp: Path, name: str) -> bool:
    return (tmp / name).exists()


def _wait_for(tmp: Path, *names: str, within: float = 60.0) -> None:
    """Wait until other ranks have written the files ``names``: a poll with a
    deadline of its own (well inside run_ranks' 120 s), so that a rank that
    never writes one fails here, naming it, instead of hanging the test."""
    deadline = time.monotonic() + within
    while not all(_seen(tmp, name) for name in names):
        if time.monotonic() > deadline:
            missing = [name for name in names if not _seen(tmp, name)]
            raise TimeoutError(
                f"rank {_rank_from_env()} waited {within:g}s for {missing} in "
                f"{tmp}: the rank that writes it never got that far"
            )
        time.sleep(0.002)


def _rank_from_env() -> str:
    # not sd.rank(): some ranks must not touch syncdeco while they wait
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return os.environ[var]
    return "?"


# -- main_first ----------------------------------------------------------------


def main_first_order(tmp: Path) -> tuple[int, bool]:
    @sd.main_first
    def prepare() -> int:
        saw_cache = _seen(tmp, "cache")
        if sd.is_main():
            _mark(tmp, "cache")  # the main rank fills the cache
        return saw_cache

    return sd.rank(), prepare()


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_main_first_runs_main_then_others(tmp_path: Path, n: int) -> None:
    results = [o.unwrap() for o in run_ranks(main_first_order, n, tmp_path)]
    assert results[0] == (0, False)  # main found no cache: it went first
    assert all(saw for _, saw in results[1:])  # the others found it filled
    assert [r for r, _ in results] == list(range(n))  # each returns its own


@pytest.mark.ranks(2)
def test_main_first_context_manager(tmp_path: Path) -> None:
    with sd.main_first():
        saw = _seen(tmp_path, "cm")
        if sd.is_main():
            _mark(tmp_path, "cm")
    assert saw is not sd.is_main()  # the main found nothing, the other its mark


def main_first_main_raises(tmp: Path) -> None:
    @sd.main_first
    def download() -> None:
        _mark(tmp, f"ran{sd.rank()}")
        raise ValueError("checksum mismatch in shard 7")

    try:
        download()
    finally:
        sd.barrier("still works")


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_main_first_failure_reaches_every_rank(tmp_path: Path, n: int) -> None:
    outcomes = run_ranks(main_first_main_raises, n, tmp_path)
    assert type(outcomes[0].error) is ValueError
    for o in outcomes[1:]:
        err = o.error
        assert isinstance(err, sd.PeerFailedError), o.tb
        assert (err.rank, err.exc_type, err.message) == (
            0,
            "ValueError",
            "checksum mismatch in shard 7",
        )
        assert "rank 0 raised ValueError: checksum mismatch in shard 7" in str(err)
        assert "main_first" in str(err) and "download" in str(err)
        assert "raise ValueError" in err.remote_traceback
    # the others never ran the body after the main rank failed
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ran0"]


# -- on_main_only ----------------------------------------------------------------


def on_main_only_plain(tmp: Path) -> object:
    @sd.on_main_only
    def save() -> str:
        _mark(tmp, f"saved{sd.rank()}")
        return "saved"

    @sd.on_main_only(default="skipped")
    def log() -> str:
        return "logged"

    return save(), log()


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_on_main_only_runs_on_main_and_others_get_default(tmp_path: Path, n: int) -> None:
    results = [o.unwrap() for o in run_ranks(on_main_only_plain, n, tmp_path)]
    assert results[0] == ("saved", "logged")
    assert all(r == (None, "skipped") for r in results[1:])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["saved0"]


def on_main_only_broadcast(tmp: Path) -> dict[str, object]:
    @sd.on_main_only(broadcast=True)
    def vocab() -> dict[str, object]:
        return {"tokens": ["<pad>", "hello"], "from": sd.rank(), "big": "x" * 100_000}

    return vocab()


@on_each_world_size
def test_on_main_only_broadcast_gives_everyone_mains_result(tmp_path: Path, n: int) -> None:
    assert sd.world_size() == n
    expected = {"tokens": ["<pad>", "hello"], "from": 0, "big": "x" * 100_000}
    assert on_main_only_broadcast(tmp_path) == expected


@pytest.mark.ranks(2)
def test_on_main_only_broadcast_failure() -> None:
    @sd.on_main_only(broadcast=True)
    def vocab() -> dict[str, int]:
        raise KeyError("vocab.json")

    if sd.is_main():
        with pytest.raises(KeyError):
            vocab()
    else:
        with pytest.raises(sd.PeerFailedError) as info:
            vocab()
        assert (info.value.rank, info.value.exc_type) == (0, "KeyError")
    sd.barrier("after")


def on_main_only_unpicklable(tmp: Path) -> object:
    @sd.on_main_only(broadcast=True)
    def handle() -> object:
        return lambda: None

    try:
        return handle()
    finally:
        sd.barrier("after")


def test_unpicklable_broadcast_fails_on_main_and_peers(tmp_path: Path) -> None:
    outcomes = run_ranks(on_main_only_unpicklable, 2, tmp_path)
    assert outcomes[0].error is not None and "could not pickle" in outcomes[0].tb
    assert isinstance(outcomes[1].error, sd.PeerFailedError)


# -- barrier_after and barrier ------------------------------------------------------


@on_each_world_size
def test_barrier_after_waits_for_every_rank(tmp_path: Path, n: int) -> None:
    @sd.barrier_after
    def step() -> None:
        _mark(tmp_path, f"step{sd.rank()}")

    step()
    assert all(_seen(tmp_path, f"step{r}") for r in range(n))


@pytest.mark.ranks(2)
def test_barrier_after_every_syncs_on_every_nth_call(tmp_path: Path) -> None:
    @sd.barrier_after(every=3)
    def step(i: int) -> None:
        _mark(tmp_path, f"r{sd.rank()}-{i}")

    for i in range(1, 7):
        step(i)
        if i % 3 == 0:  # calls 3 and 6 synced: every rank's mark is there
            assert all(_seen(tmp_path, f"r{r}-{i}") for r in range(2)), i


def barrier_after_rank_raises(tmp: Path) -> None:
    @sd.barrier_after
    def step() -> None:
        if sd.rank() == sd.world_size() - 1:
            raise RuntimeError("CUDA out of memory (pretend)")

    try:
        step()
    finally:
        sd.barrier("after")


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_barrier_after_failure_names_the_rank(tmp_path: Path, n: int) -> None:
    outcomes = run_ranks(barrier_after_rank_raises, n, tmp_path)
    last = n - 1
    assert type(outcomes[last].error) is RuntimeError
    for o in outcomes[:last]:
        assert isinstance(o.error, sd.PeerFailedError), o.tb
        assert o.error.rank == last and o.error.exc_type == "RuntimeError"
        assert f"rank {last} raised RuntimeError: CUDA out of memory (pretend)" in str(o.error)


@pytest.mark.ranks(2)
def test_barrier_after_context_manager(tmp_path: Path) -> None:
    with sd.barrier_after():
        _mark(tmp_path, f"cm{sd.rank()}")
    assert _seen(tmp_path, "cm0") and _seen(tmp_path, "cm1")


@on_each_world_size
def test_mismatched_sync_points_raise_on_all_ranks(n: int) -> None:
    with pytest.raises(sd.SyncMismatchError) as info:
        sd.barrier("save_checkpoint" if sd.rank() == 0 else "load_checkpoint")
    message = str(info.value)
    assert "'save_checkpoint'" in message and "'load_checkpoint'" in message, message
    assert "rank 0 at" in message
    sd.barrier("next")  # the group still works


@pytest.mark.ranks(2)
def test_mismatched_decorated_functions() -> None:
    @sd.barrier_after
    def save_checkpoint() -> None: ...

    @sd.barrier_after
    def load_checkpoint() -> None: ...

    with pytest.raises(sd.SyncMismatchError) as info:
        (save_checkpoint if sd.rank() == 0 else load_checkpoint)()
    assert "save_checkpoint" in str(info.value) and "load_checkpoint" in str(info.value)


@pytest.mark.ranks(2)
def test_a_failure_reported_at_another_sync_point_is_the_error_everyone_sees() -> None:
    # Rank 1 raises in a step and reports it there; rank 0 is at a barrier
    # elsewhere.  The points differ, but the cause is rank 1's error: rank 0
    # gets PeerFailedError naming it, not a mismatch.
    @sd.barrier_after
    def step() -> None:
        raise KeyError("batch 17")

    if sd.rank() == 1:
        with pytest.raises(KeyError):
            step()
    else:
        with pytest.raises(sd.PeerFailedError) as info:
            sd.barrier("evaluate")
        assert (info.value.rank, info.value.exc_type) == (1, "KeyError")
    sd.barrier("still together")


@pytest.mark.ranks(2)
def test_group_survives_many_errors() -> None:
    for i in range(10):
        with pytest.raises(sd.SyncMismatchError):
            sd.barrier(f"a{i}" if sd.rank() == 0 else f"b{i}")
        sd.barrier("together")


# -- stacking -------------------------------------------------------------------


def save_and_wait(tmp: Path) -> tuple[object, bool]:
    @sd.barrier_after
    @sd.on_main_only
    def save() -> str:
        _mark(tmp, "ckpt")
        return "path/to/ckpt"

    result = save()
    return result, _seen(tmp, "ckpt")


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_barrier_after_over_on_main_only(tmp_path: Path, n: int) -> None:
    results = [o.unwrap() for o in run_ranks(save_and_wait, n, tmp_path)]
    assert results[0] == ("path/to/ckpt", True)
    assert all(r == (None, True) for r in results[1:])  # everyone waited for the save


def save_fails_everyone_hears(tmp: Path) -> None:
    @sd.barrier_after
    @sd.on_main_only
    def save() -> None:
        raise OSError("No space left on device")

    save()


def test_stacked_save_failure(tmp_path: Path) -> None:
    outcomes = run_ranks(save_fails_everyone_hears, 2, tmp_path)
    assert type(outcomes[0].error) is OSError
    assert isinstance(outcomes[1].error, sd.PeerFailedError)
    assert outcomes[1].error.exc_type == "OSError"


class _Counting:
    """Counts sync points; delegates everything to the real TorchBackend."""

    def __init__(self) -> None:
        self.inner = sd.TorchBackend()
        self.syncs: list[str] = []

    def rank(self) -> int:
        return self.inner.rank()

    def world_size(self) -> int:
        return self.inner.world_size()

    def local_rank(self) -> int:
        return self.inner.local_rank()

    def sync(self, point: sd.SyncPoint, **kw: object) -> object:
        self.syncs.append(f"{point.kind}:{point.name}")
        return self.inner.sync(point, **kw)  # type: ignore[arg-type]


@pytest.mark.ranks(2)
def test_nested_main_first_adds_no_wait() -> None:
    counting = _Counting()

    @sd.main_first(name="inner")
    def inner() -> int:
        return 1

    @sd.main_first(name="outer")
    def outer() -> int:
        with sd.main_first():
            return inner() + 1

    with sd.use_backend(counting):
        assert outer() == 2
    assert counting.syncs == ["main_first:outer"]


def sync_inside_on_main_only(tmp: Path) -> object:
    @sd.on_main_only
    def save() -> None:
        sd.barrier("inside")  # only rank 0 gets here: would hang

    return save()


def test_sync_inside_on_main_only_raises_at_once(tmp_path: Path) -> None:
    outcomes = run_ranks(sync_inside_on_main_only, 2, tmp_path)
    err = outcomes[0].error
    assert isinstance(err, sd.CompositionError), outcomes[0].tb
    assert "'inside'" in str(err) and "on_main_only" in str(err)
    assert outcomes[1].unwrap() is None


def sync_inside_main_first(tmp: Path) -> object:
    @sd.main_first
    def load() -> None:
        sd.barrier("inside")

    return load()


def test_sync_inside_main_first_raises_instead_of_hanging(tmp_path: Path) -> None:
    outcomes = run_ranks(sync_inside_main_first, 2, tmp_path)
    assert isinstance(outcomes[0].error, sd.CompositionError)
    assert isinstance(outcomes[1].error, sd.PeerFailedError)
    assert outcomes[1].error.exc_type == "CompositionError"


# -- kinds of callables on real ranks ------------------------------------------------


class Trainer:
    def __init__(self) -> None:
        self.saved = 0

    @sd.barrier_after
    @sd.on_main_only(broadcast=True)
    def save(self, step: int) -> str:
        self.saved += 1
        return f"ckpt-{step}"

    @sd.main_first
    @classmethod
    def build(cls) -> str:
        return cls.__name__

    @sd.barrier_after
    @staticmethod
    def step() -> int:
        return sd.rank()


def methods(tmp: Path) -> tuple[object, ...]:
    t = Trainer()
    return t.save(5), t.saved, Trainer.build(), Trainer.step(), t.step()


def test_methods_classmethods_staticmethods(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(methods, 2, tmp_path)]
    assert outcomes == [("ckpt-5", 1, "Trainer", 0, 0), ("ckpt-5", 0, "Trainer", 1, 1)]


def coroutines(tmp: Path) -> object:
    @sd.main_first
    async def fetch() -> bool:
        saw = _seen(tmp, "async")
        if sd.is_main():
            _mark(tmp, "async")
        return saw

    @sd.on_main_only(broadcast=True)
    async def meta() -> dict[str, int]:
        return {"rank": sd.rank()}

    async def main() -> tuple[bool, dict[str, int]]:
        return await fetch(), await meta()

    return asyncio.run(main())


def test_async_functions(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(coroutines, 2, tmp_path)]
    assert outcomes == [(False, {"rank": 0}), (True, {"rank": 0})]


# -- timeouts ---------------------------------------------------------------------


def member_late(tmp: Path) -> tuple[object, ...]:
    first: object = "ok"
    if sd.rank() == 1:
        _wait_for(tmp, "main-gave-up")
    try:
        sd.barrier("late", timeout=0.5)
    except sd.SyncTimeoutError as err:
        first = err.missing
        if sd.rank() == 0:
            _mark(tmp, "main-gave-up")
    sd.barrier("next", timeout=30)  # the stale arrival does not confuse it
    return first, isinstance(first, tuple)


def test_timeout_names_the_missing_rank(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(member_late, 2, tmp_path)]
    assert outcomes == [((1,), True), ((1,), True)]


def main_late(tmp: Path) -> object:
    result: object = "ok"
    if sd.rank() == 0:
        _wait_for(tmp, "member-gave-up")
    try:
        sd.barrier("late", timeout=0.5)
    except sd.SyncTimeoutError as err:
        result = err.missing
        _mark(tmp, "member-gave-up")
    sd.barrier("next", timeout=30)
    return result


def test_member_times_out_when_main_is_missing(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(main_late, 2, tmp_path)]
    # rank 1 gave up on rank 0; rank 0, arriving later, learns it came too
    # late instead of reporting success: both ranks agree
    assert outcomes == [(0,), (0,)]


def main_first_body_too_slow(tmp: Path) -> object:
    result: object = "ok"
    try:
        with sd.main_first(timeout=0.5):
            if sd.rank() == 0:
                _wait_for(tmp, "member-gave-up")
    except sd.SyncTimeoutError as err:
        result = err.missing
        if sd.rank() == 1:
            _mark(tmp, "member-gave-up")
    sd.barrier("next", timeout=30)
    return result


def test_main_first_timeout_is_seen_by_main_too(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(main_first_body_too_slow, 2, tmp_path)]
    assert outcomes == [(0,), (0,)]


# -- backend resolution on real ranks ----------------------------------------------------


def from_launcher_env(tmp: Path) -> tuple[object, ...]:
    import torch.distributed as dist

    before = dist.is_initialized()
    facts = (sd.rank(), sd.world_size(), sd.local_rank(), sd.is_main())
    got = on_main_only_broadcast(tmp)
    return (
        before,
        facts,
        dist.is_initialized(),
        dist.get_backend(),
        type(sd.get_backend()).__name__,
        got["from"],
    )


def test_backend_initialises_group_from_torchrun_env(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(from_launcher_env, 2, tmp_path, init=False)]
    assert outcomes[0] == (False, (0, 2, 0, True), True, "gloo", "TorchBackend", 0)
    assert outcomes[1] == (False, (1, 2, 1, False), True, "gloo", "TorchBackend", 0)


def explicit_init(tmp: Path) -> tuple[object, ...]:
    backend = sd.init("gloo", timeout=60)
    return type(backend).__name__, sd.get_backend() is backend, sd.barrier() is None


def test_init_with_a_backend_name(tmp_path: Path) -> None:
    for o in run_ranks(explicit_init, 2, tmp_path, init=False):
        assert o.unwrap() == ("TorchBackend", True, True)


def null_inside_ranks(tmp: Path) -> tuple[object, ...]:
    with sd.use_backend(sd.NullBackend()):
        return sd.rank(), sd.world_size(), on_main_only_broadcast(tmp)["from"]


def test_use_backend_overrides_the_group(tmp_path: Path) -> None:
    assert [o.unwrap() for o in run_ranks(null_inside_ranks, 2, tmp_path)] == [(0, 1, 0), (0, 1, 0)]


# -- local=True on simulated nodes (the real two-agent torchrun run is in test_torchrun.py) --


def local_main_first(tmp: Path) -> tuple[int, int, bool, bool]:
    node = os.environ["GROUP_RANK"]

    @sd.main_first(local=True)
    def fill() -> bool:
        saw = _seen(tmp, f"node{node}")
        if sd.is_main(local=True):
            _mark(tmp, f"node{node}")
        return saw

    saw = fill()
    return sd.rank(), sd.local_rank(), sd.is_main(local=True), saw


def test_local_main_first_per_node(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(local_main_first, 4, tmp_path, nodes=2)]
    assert outcomes == [
        (0, 0, True, False),
        (1, 1, False, True),
        (2, 0, True, False),
        (3, 1, False, True),
    ]


def local_broadcast(tmp: Path) -> object:
    @sd.on_main_only(broadcast=True, local=True)
    def node_info() -> tuple[int, str]:
        return sd.rank(), os.environ["GROUP_RANK"]

    return node_info()


def test_local_broadcast_per_node(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(local_broadcast, 4, tmp_path, nodes=2)]
    assert outcomes == [(0, "0"), (0, "0"), (2, "1"), (2, "1")]


def four_rank_mix(tmp: Path) -> object:
    results = []
    for i in range(5):
        results.append(on_main_only_broadcast(tmp)["from"])
        sd.barrier(f"round{i}")
    return results


def test_many_sync_points_on_four_ranks(tmp_path: Path) -> None:
    for o in run_ranks(four_rank_mix, 4, tmp_path):
        assert o.unwrap() == [0] * 5


# -- launchers' environments, and what rank facts must not do --------------------------------


def local_main_first_any_launcher(tmp: Path) -> tuple[int, int, bool, bool]:
    @sd.main_first(local=True)
    def fill() -> bool:
        saw = _seen(tmp, "cache")
        if sd.is_main(local=True):
            _mark(tmp, "cache")
        return saw

    saw = fill()
    return sd.rank(), sd.local_rank(), sd.is_main(local=True), saw


@pytest.mark.parametrize("launcher", ["slurm", "ompi"])
def test_slurm_and_open_mpi_environments(tmp_path: Path, launcher: str) -> None:
    outcomes = [
        o.unwrap() for o in run_ranks(local_main_first_any_launcher, 2, tmp_path, launcher=launcher)
    ]
    assert outcomes == [(0, 0, True, False), (1, 1, False, True)]


def nodes_do_not_wait_for_each_other(tmp: Path) -> bool:
    node = os.environ["GROUP_RANK"]
    if node == "1":
        # Node 1 touches syncdeco only once node 0 is done with its local
        # main_first: a local sync point must not need node 1 at all.
        _wait_for(tmp, "node0-rank0", "node0-rank1")
    saw = local_main_first(tmp)[3]
    if node == "0":
        _mark(tmp, f"node0-rank{sd.rank()}")
    sd.barrier("all")
    return saw


def test_local_sync_waits_only_within_the_node(tmp_path: Path) -> None:
    outcomes = [
        o.unwrap() for o in run_ranks(nodes_do_not_wait_for_each_other, 4, tmp_path, nodes=2)
    ]
    assert outcomes == [False, True, False, True]


def rank_facts_before_the_users_own_group(tmp: Path) -> tuple[object, ...]:
    import torch.distributed as dist

    facts = (sd.rank(), sd.world_size(), sd.is_main())

    @sd.on_main_only
    def log() -> str:
        return "logged"

    logged = log()
    initialised = dist.is_initialized()  # asking must not have created the group
    dist.init_process_group("gloo")  # the user's own, as in any torchrun script
    sd.barrier("after init")
    return facts, logged, initialised


def test_rank_facts_have_no_side_effects(tmp_path: Path) -> None:
    outcomes = [
        o.unwrap()
        for o in run_ranks(rank_facts_before_the_users_own_group, 2, tmp_path, init=False)
    ]
    assert outcomes == [((0, 2, True), "logged", False), ((1, 2, False), None, False)]


# -- who is missing, and where it was last seen --------------------------------------------


def stalled_member(tmp: Path) -> object:
    sd.barrier("warm up")
    if sd.rank() == 1:
        _wait_for(tmp, "main-gave-up")
    try:
        sd.barrier("stalled", timeout=0.5)
    except sd.SyncTimeoutError as err:
        if sd.rank() == 0:
            _mark(tmp, "main-gave-up")
        return err.missing, err.last_seen, str(err)
    return "no timeout"


def test_timeout_says_where_the_missing_rank_was_last_seen(tmp_path: Path) -> None:
    main, late = [o.unwrap() for o in run_ranks(stalled_member, 2, tmp_path)]
    missing, last_seen, message = main
    assert missing == (1,)
    assert "barrier 'warm up'" in last_seen[1] and "test_ranks.py:" in last_seen[1]
    assert "rank(s) 1 did not arrive: rank 1 (last seen at barrier 'warm up'" in message
    assert late[0] == (1,) and "too late" in late[2]


def warns_while_waiting(tmp: Path) -> object:
    import logging

    sd.init(warn_after=0.3)
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            assert record.rank == sd.rank()  # type: ignore[attr-defined]  # for %(rank)s
            records.append(record.getMessage())
            _mark(tmp, "warned")

    logging.getLogger("syncdeco").addHandler(Capture())
    sd.barrier("before")
    if sd.rank() == 1:
        _wait_for(tmp, "warned")  # arrive only once rank 0 has warned
    sd.barrier("slow one", timeout=60)
    return records


def test_long_waits_are_logged_with_who_is_missing(tmp_path: Path) -> None:
    main, member = [o.unwrap() for o in run_ranks(warns_while_waiting, 2, tmp_path)]
    assert main, "rank 0 logged nothing"
    assert "rank 0 has waited" in main[0] and "barrier 'slow one'" in main[0]
    assert "missing 1 (last seen at barrier 'before'" in main[0]
    assert member == []  # rank 1 did not wait long


def after_teardown(tmp: Path) -> str:
    import torch.distributed as dist

    sd.barrier("last good one")
    dist.destroy_process_group()
    try:
        sd.barrier("too late")
    except sd.SyncError as err:
        return str(err)
    return "no error"


def test_sync_after_the_group_was_destroyed(tmp_path: Path) -> None:
    for o in run_ranks(after_teardown, 2, tmp_path):
        message = o.unwrap()
        assert "destroyed" in message and f"rank {o.rank}" in message


@pytest.mark.ranks(2)
def test_sync_after_teardown_of_a_group_no_launcher_described() -> None:
    # A group set up by hand (or by a framework) in processes whose
    # environment names no launcher: syncdeco must not fall back to the Null
    # backend, where a barrier would pass alone, once the group is gone.
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        del os.environ[key]
    rank = dist.get_rank()
    sd.barrier("while the group lives")
    dist.destroy_process_group()
    with pytest.raises(sd.SyncError, match="destroyed"):
        sd.barrier("after teardown")
    assert (sd.rank(), sd.world_size()) == (rank, 2)  # still this process's rank


@pytest.mark.ranks(2, init=False)
def test_teardown_of_the_group_syncdeco_made() -> None:
    import torch.distributed as dist

    sd.init(timeout=30)  # under torchrun's variables: syncdeco makes the group
    sd.barrier("while the group lives")
    dist.destroy_process_group()
    with pytest.raises(sd.SyncError, match="destroyed"):
        sd.barrier("after teardown")  # not a second, silent init_process_group
    assert not dist.is_initialized()


@pytest.mark.ranks(2)
def test_teardown_before_any_sync_point() -> None:
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        del os.environ[key]
    rank = sd.rank()  # syncdeco has seen the group, nothing more
    dist.destroy_process_group()
    with pytest.raises(sd.SyncError, match=r"rank \d at barrier 'after teardown'.*destroyed"):
        sd.barrier("after teardown")

    @sd.on_main_only(default="skipped")
    def save() -> str:
        return "saved"

    assert save() == ("saved" if rank == 0 else "skipped")  # not "saved" on both


@pytest.mark.ranks(2)
def test_destroy_process_group_frees_the_group() -> None:
    # syncdeco holds the group weakly. A strong reference kept it alive after
    # destroy_process_group() until interpreter teardown, where Gloo aborted
    # the process ("terminate called without an active exception") in about
    # 1 run in 5 of a tensor broadcast under torchrun.
    import gc
    import weakref

    import torch
    import torch.distributed as dist

    group = weakref.ref(dist.distributed_c10d._get_default_group())

    @sd.on_main_only(broadcast=True)
    def make() -> torch.Tensor:
        return torch.arange(8)

    assert make().tolist() == list(range(8))
    dist.destroy_process_group()
    gc.collect()
    assert group() is None, "the destroyed process group is still referenced"
    with pytest.raises(sd.SyncError, match="destroyed"):
        sd.barrier("after teardown")


# -- results that hold tensors ------------------------------------------------------------


def tensor_results(tmp: Path) -> object:
    import torch

    @sd.barrier_after
    @sd.main_first
    @sd.on_main_only(broadcast=True)
    def weights() -> dict[str, object]:
        return {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * (sd.rank() + 1),
            "p": torch.nn.Parameter(torch.ones(2)),
            "ids": [torch.tensor([1, 2, 3]), "plain"],
            "step": 7,
        }

    got = weights()
    assert isinstance(got, dict)
    return (
        got["w"].tolist(),
        type(got["p"]).__name__,
        got["p"].requires_grad,
        got["ids"][0].tolist(),
        got["ids"][1],
        got["step"],
        got["w"].device.type,
    )


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_tensor_results_reach_every_rank(tmp_path: Path, n: int) -> None:
    outcomes = [o.unwrap() for o in run_ranks(tensor_results, n, tmp_path)]
    expected = (
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]],
        "Parameter",
        True,
        [1, 2, 3],
        "plain",
        7,
        "cpu",
    )
    assert outcomes == [expected] * n


@pytest.mark.ranks(3)
def test_large_tensor_results_arrive_intact() -> None:
    # Large CPU results land in buffers that ask for huge pages and are
    # faulted in ahead of the broadcast; sizes that are not a whole number of
    # pages, and more than one tensor, must still arrive bit for bit.
    import torch

    def expected() -> dict[str, torch.Tensor]:
        return {
            "a": torch.arange(5 * 2**20 + 7, dtype=torch.float64),  # 40 MiB and 56 bytes
            "b": torch.arange(9 * 2**20 + 1, dtype=torch.int32) % 251,  # 36 MiB and 4 bytes
        }

    @sd.on_main_only(broadcast=True)
    def build() -> dict[str, torch.Tensor]:
        return expected()

    got, want = build(), expected()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        got[key].add_(1)  # the receiver owns writable memory


def local_tensor_results(tmp: Path) -> object:
    import torch

    @sd.on_main_only(broadcast=True, local=True)
    def node_tensor() -> torch.Tensor:
        return torch.full((2,), float(sd.rank()))

    return node_tensor().tolist()


def test_local_tensor_results_stay_within_the_node(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(local_tensor_results, 4, tmp_path, nodes=2)]
    assert outcomes == [[0.0, 0.0], [0.0, 0.0], [2.0, 2.0], [2.0, 2.0]]


def profiled(tmp: Path) -> list[str]:
    import torch

    @sd.barrier_after(name="train_step")
    def step() -> None: ...

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        with sd.main_first(name="load_data"):
            pass
    return sorted({e.name for e in prof.events() if e.name.startswith("syncdeco.")})


def test_sync_points_are_named_in_profiler_traces(tmp_path: Path) -> None:
    for o in run_ranks(profiled, 2, tmp_path):
        assert o.unwrap() == ["syncdeco.barrier_after:train_step", "syncdeco.main_first:load_data"]


def tricky_tensors(tmp: Path) -> object:
    import torch

    @sd.on_main_only(broadcast=True)
    def result() -> tuple[object, ...]:
        x = torch.arange(4.0)
        return x, x, torch.tensor([1 + 2j]).conj(), torch.empty(0), torch.empty(3, device="meta")

    x, same, conj, empty, meta = result()
    return x is same, x.tolist(), conj.tolist(), tuple(empty.shape), meta.device.type


def test_shared_conjugate_empty_and_meta_tensors(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(tricky_tensors, 2, tmp_path)]
    assert outcomes == [(True, [0.0, 1.0, 2.0, 3.0], [1 - 2j], (0,), "meta")] * 2


# -- where a missing rank is stuck ------------------------------------------------


def load_batch(tmp: Path) -> None:
    """A user function rank 1 is stuck in (a slow filesystem, a data loader),
    until the others have given up on it (with a deadline of its own)."""
    deadline = time.monotonic() + 60
    # No helper of this file in the loop: its innermost frame of user code
    # must be this function whenever its stack is taken (_seen would be one).
    while not ((tmp / "rank0-gave-up").exists() and (tmp / "rank2-gave-up").exists()):
        if time.monotonic() > deadline:
            raise TimeoutError("ranks 0 and 2 never gave up on rank 1")
        time.sleep(0.002)


def stuck_in_a_user_function(tmp: Path) -> object:
    sd.barrier("warm up")
    if sd.rank() == 1:
        load_batch(tmp)
        try:
            sd.barrier("end of epoch", timeout=60)
        except sd.SyncTimeoutError as err:
            return err.missing
        return "passed"
    try:
        sd.barrier("end of epoch", timeout=1)
    except sd.SyncTimeoutError as err:
        return err.missing, err.places, err.stacks, str(err)
    finally:
        _mark(tmp, f"rank{sd.rank()}-gave-up")
    return "passed"


def test_a_timeout_names_the_user_function_a_missing_rank_is_in(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(stuck_in_a_user_function, 3, tmp_path)]
    assert outcomes[1] == (1,)  # it came too late, and was told so
    for rank in (0, 2):  # the main, and a member that heard from the main
        missing, places, stacks, message = outcomes[rank]
        assert missing == (1,)
        assert places[1].startswith("is in load_batch (") and "test_ranks.py:" in places[1]
        assert "in load_batch" in stacks[1] and "in stuck_in_a_user_function" in stacks[1]
        assert "rank 1 (last seen at " in message and ") is in load_batch (" in message
        assert ".stacks" in message
