import compileall
from pathlib import Path

import pytest

import syncdeco._select

ROOT = Path(__file__).resolve().parent.parent

# Tests that take the longest (a pytest run of its own, torchrun jobs of
# frameworks and examples): run first, so that with the suite's three xdist
# workers none of them starts last and runs alone.  (The
# multi-node false-alarm job's minute of waiting runs while the module's
# other tests do: test_multinode.py starts it with its first test.)
LONG_FIRST = (
    "tests/test_plugin.py::test_marker_runs_tests_on_ranks_and_reports_each_rank",
    "tests/test_scale.py",
    "tests/test_frameworks.py",
    "tests/test_torchrun.py",
    "tests/test_examples.py",
    "tests/test_gpu_check.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's modules once, before any worker starts.

    The suite starts a few hundred Python processes that import syncdeco.
    Where ``PYTHONDONTWRITEBYTECODE`` is set (as on the CI machine), none of
    them writes bytecode, so each one compiles every syncdeco module it
    imports again (about 0.13 s of CPU for the sync plane).  Bytecode written
    here is read by all of them.  It goes to the ``__pycache__`` folders an
    ordinary run writes anyway.
    """
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has done it
    for folder in ("syncdeco", "tests", "examples", "benchmarks"):
        compileall.compile_dir(ROOT / folder, quiet=1)


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
