"""pytest plugin: run a test on N real Gloo ranks with ``@pytest.mark.ranks(n)``.

Installed with syncdeco (entry point ``pytest11``), so any project can test
its own multi-rank code:

    @pytest.mark.ranks(4)
    def test_cache_is_built_once(tmp_path):
        build_cache(tmp_path)              # decorated with @sd.main_first
        assert (tmp_path / "cache").exists()

The test function runs on every rank, each its own process with torchrun's
environment and a Gloo process group; its fixtures are set up once, in the
pytest process, and sent to the ranks (so they must pickle: ``tmp_path`` is
the usual one, a directory every rank shares).  The test passes when every
rank returns; otherwise each failing rank's traceback is shown under its
rank.  Ranks that hang fail the test after ``timeout`` seconds with the stack
each was stuck in, and no process is left behind.

Marker options: ``timeout`` (seconds, default 120), ``launcher``
("torchrun", "slurm" or "ompi": whose environment variables the ranks see),
``nodes`` (simulated nodes) and ``init`` (False: the ranks start bare, as a
launched script does: no process group and no meeting before the test body,
under any launcher; the first sync point brings the group up).  Different world sizes for
one test: ``pytest.param(..., marks=pytest.mark.ranks(n))`` in a parametrize.

Each rank imports the test module again, with pytest's assertion rewriting
where pytest applied it, so a failing ``assert`` shows the values it compared
(pytest's long diffs of containers and strings are not produced on the ranks).
torch is imported only when a test carrying the marker runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import inspect
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from ._errors import PeerFailedError

__all__ = ["pytest_configure", "pytest_pyfunc_call", "pytest_runtest_makereport"]

_DEFAULT_TIMEOUT = 120.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ranks(n, *, timeout=120, launcher='torchrun', nodes=1, init=True): "
        "run the test on n Gloo ranks, each its own process (syncdeco)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    marker = pyfuncitem.get_closest_marker("ranks")
    if marker is None:
        return None
    world_size, options = _parse(marker, pyfuncitem.nodeid)
    function = pyfuncitem.obj
    if inspect.iscoroutinefunction(function):
        pytest.fail("@pytest.mark.ranks does not run async test functions", pytrace=False)
    kwargs = {name: pyfuncitem.funcargs[name] for name in inspect.signature(function).parameters}
    for name, value in kwargs.items():
        try:
            pickle.dumps(value)
        except Exception as exc:
            problem = f"{name!r} of {pyfuncitem.name} to its ranks: {exc!r}"
            break
    else:
        problem = None
    if problem is not None:
        pytest.fail(
            f"@pytest.mark.ranks cannot send fixture/argument {problem}. Fixtures are set "
            f"up in the pytest process and pickled to each rank; use picklable ones "
            f"(tmp_path, parameters) or build the object inside the test.",
            pytrace=False,
        )
    from .testing import HungRanksError, run_ranks

    ref = _TestRef.of(pyfuncitem)
    try:
        outcomes = run_ranks(_run_test, world_size, ref, kwargs, **options)
    except HungRanksError as exc:
        hung: HungRanksError | None = exc
    else:
        hung = None
    if hung is not None:
        pytest.fail(f"@pytest.mark.ranks({world_size}): {hung}", pytrace=False)
    failed = [o for o in outcomes if o.error is not None]
    passed_on = [o.value for o in outcomes if isinstance(o.value, _Outcome)]
    if not failed and passed_on:
        first = passed_on[0]
        if first.kind == "xfail":
            pytest.xfail(first.reason)
        pytest.skip(first.reason)
    if failed:
        # The ranks that raised on their own first, then those told of it.
        failed.sort(key=lambda o: (isinstance(o.error, PeerFailedError), o.rank))
        which = ", ".join(f"rank {o.rank} {type(o.error).__name__}" for o in failed)
        pytest.fail(
            f"{len(failed)} of {world_size} ranks failed ({which})\n"
            + "\n".join(f"--- rank {o.rank} of {world_size} ---\n{o.tb}" for o in failed),
            pytrace=False,
        )
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep a ranks test's line in the short summary to its headline ("2 of 4
    ranks failed (...)").  On CI pytest prints the whole message there, which
    would repeat every rank's traceback from the failure section."""
    report = yield
    crash = getattr(report.longrepr, "reprcrash", None)
    if report.failed and crash is not None and item.get_closest_marker("ranks") is not None:
        crash.message = crash.message.split("\n", 1)[0]
    return report


def _parse(marker: pytest.Mark, nodeid: str) -> tuple[int, dict[str, Any]]:
    if len(marker.args) != 1 or not isinstance(marker.args[0], int) or marker.args[0] < 1:
        raise pytest.UsageError(
            f"{nodeid}: @pytest.mark.ranks takes one positive int, the number of "
            f"ranks (got args {marker.args!r}); e.g. @pytest.mark.ranks(4)"
        )
    allowed = {"timeout", "launcher", "nodes", "init"}
    unknown = set(marker.kwargs) - allowed
    if unknown:
        raise pytest.UsageError(
            f"{nodeid}: @pytest.mark.ranks got unknown option(s) {sorted(unknown)}; "
            f"it takes {sorted(allowed)}"
        )
    return marker.args[0], {"timeout": _DEFAULT_TIMEOUT, **marker.kwargs}


class _TestRef:
    """Where a rank finds the test function: its module (by name, or by file
    when the name does not import), its qualified name, and whether pytest
    rewrote the module's asserts (the rank then does too)."""

    def __init__(self, module: str, path: str, qualname: str, rewrite: bool) -> None:
        self.module, self.path, self.qualname, self.rewrite = module, path, qualname, rewrite

    @classmethod
    def of(cls, item: pytest.Function) -> _TestRef:
        from _pytest.assertion.rewrite import AssertionRewritingHook

        function = item.obj
        module = sys.modules[function.__module__]
        rewritten = isinstance(getattr(module, "__loader__", None), AssertionRewritingHook)
        return cls(function.__module__, str(module.__file__), function.__qualname__, rewritten)

    def load(self) -> Any:
        module = sys.modules.get(self.module) or self._import()
        found = module
        for part in self.qualname.split("."):
            if isinstance(found, type):
                found = found()  # a test class: pytest makes one instance per test
            found = getattr(found, part)
        return found

    def _import(self) -> Any:
        try:
            by_name = importlib.util.find_spec(self.module)  # imports its packages
        except (ImportError, ValueError):
            by_name = None
        if by_name is None or by_name.origin != self.path:
            sys.path.insert(0, str(Path(self.path).parent))
        loader_type = _RewritingLoader if self.rewrite else importlib.machinery.SourceFileLoader
        loader = loader_type(self.module, self.path)
        spec = importlib.util.spec_from_file_location(self.module, self.path, loader=loader)
        if spec is None:
            raise ImportError(f"cannot import test module {self.module} from {self.path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[self.module] = module
        try:
            loader.exec_module(module)
        except BaseException:
            del sys.modules[self.module]
            raise
        return module


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    """Compiles a test module with pytest's assertion rewriting, as pytest did
    in its own process, so a failing ``assert`` on a rank shows the values it
    compared.  Never reads or writes a bytecode cache: the plain one would
    skip the rewriting, and rewritten code must not end up in it."""

    def get_code(self, fullname: str) -> Any:
        from _pytest.assertion.rewrite import rewrite_asserts

        source = self.get_data(self.path)
        tree = ast.parse(source, filename=self.path)
        rewrite_asserts(tree, source, self.path)
        return compile(tree, self.path, "exec", dont_inherit=True)


class _Outcome:
    """A rank called pytest.skip or pytest.xfail (their exceptions do not
    pickle): the test is skipped or xfailed if no rank failed."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind, self.reason = kind, reason


def _run_test(ref: _TestRef, kwargs: dict[str, Any]) -> _Outcome | None:
    try:
        ref.load()(**kwargs)
    except pytest.skip.Exception as exc:
        return _Outcome("skip", str(exc))
    except pytest.xfail.Exception as exc:
        return _Outcome("xfail", str(exc))
    return None
