import pytest

import syncdeco._select

# The tests that take longest: a prefix of node ids, and about how many
# seconds of wall the tests it names took together in a full run on the
# 2-core machine (rough: for the layout below only).  The tests of a prefix
# stay together, in their order: test_multinode.py's cluster is a module
# fixture, and its first test starts the false-alarm job's minute of
# waiting, which then runs while the others do.
LONG: dict[str, float] = {
    "tests/test_multinode.py": 90,
    "tests/test_typing.py": 35,  # mypy, with no cache in a fresh clone
    "tests/test_plugin.py::test_marker_runs_tests_on_ranks_and_reports_each_rank": 30,
    "tests/test_failfast.py::test_a_node_lost_while_the_others_are_in_their_all_reduce": 30,
    "tests/test_scale.py": 15,
    "tests/test_startup.py::test_run_ranks_without_init_starts_bare[torchrun]": 14,
    "tests/test_startup.py::test_a_rank_killed_before_the_group_exists_is_named_at_the_": 23,
    "tests/test_startup.py::test_a_late_rank_is_named_at_the_first_sync_points_timeout[": 20,
    "tests/test_torchrun.py": 15,
    "tests/test_benchmarks.py": 13,
    "tests/test_examples.py::test_quickstart_on_four_gloo_ranks": 12,
    "tests/test_examples.py::test_datasets_main_first_tokenizes_once_on_gloo_ranks": 12,
    "tests/test_examples.py::test_when_things_go_wrong_on_two_gloo_ranks": 11,
    "tests/test_docs.py::test_snippet_runs[getting-started.md:33]": 11,
    "tests/test_gpu_check.py": 11,
    "tests/test_frameworks.py": 25,
    "tests/test_startup.py::test_a_group_the_program_made_is_used_as_it_is[torchrun]": 10,
    "tests/test_startup.py::test_a_member_that_ends_before_the_first_sync_point_is_named[": 30,
    "tests/test_tier.py::test_two_torchrun_nodes_sync_through_their_stores": 17,
    "tests/test_tier.py::test_a_node_that_waits_for_a_late_node_prints_nothing": 10,
    "tests/test_examples.py::test_ddp_checkpoint": 18,
    "tests/test_where.py::test_where_shows_each_rank_of_a_hung_torchrun_job": 14,
    "tests/test_startup.py::test_a_restarted_torchrun_job_does_not_read_the_last_attempts": 9,
    "tests/test_share.py::test_a_result_too_large_for_dev_shm_reaches_every_rank": 13,
    "tests/test_share.py::test_a_node_main_that_cannot_write_hands_on_through_the_store": 11,
    "tests/test_exits.py::test_exit_before_a_local_sync_point_reaches_that_node_only": 8,
}

MIDDLE = 1.2  # seconds a test not in LONG takes, on average (rough)

# Modules of tests in this process alone (milliseconds each): last, so that
# the end of the run is many short tests, which the workers share out.
FAST = (
    "tests/test_core.py",
    "tests/test_single.py",
    "tests/test_env.py",
    "tests/test_lease.py",
    "tests/test_session.py",
    "tests/test_imports.py",
)


def _chunk_sizes(n: int, workers: int) -> list[int]:
    """How pytest-xdist's worksteal scheduler first splits ``n`` tests among
    ``workers`` idle workers: contiguous runs, in order (each then steals
    from the end of the longest queue left)."""
    sizes = []
    for left in range(workers, 0, -1):
        sizes.append((n - sum(sizes)) // left)
    return sizes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Lay the tests out so that each xdist worker starts with its share of
    the long ones, longest first, and the run ends on short ones.

    With ``--dist worksteal`` each worker is first given a contiguous run of
    the collected tests, and steals from the end of the longest queue once
    its own is empty; had the long tests simply gone first, one worker would
    have run them all, one after another.  Here the ``LONG`` prefixes' tests
    are dealt to the runs as a greedy scheduler would (the next longest to
    the run with the least so far), each run starting with them, longest
    first; then the other tests, one at a time, the same way (``MIDDLE``
    seconds each); each run ends with its share of the ``FAST`` modules.
    Every worker computes the same order from the same collection, as xdist
    requires."""
    units: dict[str, list[pytest.Item]] = {}  # a LONG prefix: its tests, in order
    middle: list[pytest.Item] = []
    fast: list[pytest.Item] = []
    for item in items:
        prefix = next((p for p in LONG if item.nodeid.startswith(p)), None)
        if prefix is not None:
            units.setdefault(prefix, []).append(item)
        else:
            (fast if item.nodeid.startswith(FAST) else middle).append(item)
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    sizes = _chunk_sizes(len(items), workers)
    runs: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0.0] * workers

    def deal(tests: list[pytest.Item], seconds: float) -> None:
        room = [j for j in range(workers) if len(runs[j]) < sizes[j]] or list(range(workers))
        j = min(room, key=lambda j: load[j])
        runs[j] += tests
        load[j] += seconds

    for prefix in sorted(units, key=lambda p: -LONG[p]):  # longest first
        deal(units[prefix], LONG[prefix])
    for item in middle:
        deal([item], MIDDLE)
    for item in fast:
        deal([item], 0.0)
    items[:] = [item for run in runs for item in run]


@pytest.fixture(autouse=True)
def _fresh_config():
    syncdeco._select.reset()
    yield
    syncdeco._select.reset()
