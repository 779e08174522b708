import pytest

import syncdeco._select

# Tests that take the longest (the false-alarm job's minute of waiting, a
# minute of mypy, a pytest run of its own, torchrun jobs of frameworks and
# examples): run first, so that with the suite's two xdist workers none of
# them starts last and runs alone.
LONG_FIRST = (
    "tests/test_multinode.py::test_no_false_alarm_for_a_held_gil_a_stopped_rank_or_a_short_cut",
    "tests/test_typing.py",
    "tests/test_plugin.py::test_marker_runs_tests_on_ranks_and_reports_each_rank",
    "tests/test_scale.py",
    "tests/test_frameworks.py",
    "tests/test_torchrun.py",
    "tests/test_examples.py",
    "tests/test_gpu_check.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        for i, prefix in enumerate(LONG_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONG_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _fresh_config():
    syncdeco._select.reset()
    yield
    syncdeco._select.reset()
