import pytest

import syncdeco._select

# Tests that take the longest (a minute of mypy, a pytest run of its own,
# torchrun jobs of frameworks and examples): run first, so that with the
# suite's two xdist workers none of them starts last and runs alone.  (The
# multi-node false-alarm job's minute of waiting runs while the module's
# other tests do: test_multinode.py starts it with its first test.)
LONG_FIRST = (
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
