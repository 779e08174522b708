"""Where a missing rank is: its main thread's stack, asked for over the store.

Real processes answer through a real (libuv) TCPStore served by the test
process.  Each child waits at a known line for a byte on a FIFO, and writes a
file when it gets there; nothing is ordered by sleeping.  Every wait has its
own deadline, and every child is ended by the fixture that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import zygote

import syncdeco
from syncdeco import _proc
from syncdeco._plane import stacks as _stacks
from syncdeco._plane.stacks import (
    StackResponder,
    fetch_stacks,
    innermost_user_frame,
    main_thread_stack,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "stack_child.py"
PREFIX = "test/stacks"  # the children's
START = 120.0  # seconds a child may take to import torch and start answering, on a loaded machine


def waits_at(function: str) -> int:
    """The line of stack_child.py where ``function`` waits."""
    for number, line in enumerate(SCRIPT.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# waits: {function}"):
            return number
    raise AssertionError(f"no '# waits: {function}' line in {SCRIPT}")


def stop(pid: int, within: float = 10.0) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it has stopped: each
    thread stops on its own way back to user space, after ``kill`` returns
    (on a loaded machine, a thread already woken may not have run yet)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + within
    tasks = Path(f"/proc/{pid}/task")
    while True:
        # (a thread that ended meanwhile has no state: None)
        states = [_proc.state(int(task.name), tasks) for task in tasks.iterdir()]
        if all(state in (None, "T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {within:g} s: {states}")
        time.sleep(0.001)


def answering(store: Any, prefix: str, rank: int = 0) -> None:
    """Wait until the stack responder of ``rank`` under ``prefix`` has said in
    the store that it answers (the key fetch_stacks looks for), through
    ``store``, a connection other than the responder's."""
    store.wait([_stacks._Keys(prefix, rank).who], timedelta(seconds=START))


@pytest.fixture
def server() -> Iterator[Any]:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30), wait_for_workers=False)
    yield store


def connect(server: Any) -> Any:
    return dist.TCPStore(
        "127.0.0.1", server.port, 1, False, timedelta(seconds=30), wait_for_workers=False
    )


class Child:
    """stack_child.py in ``mode``, forked from the zygote (``zygote.py``: torch
    imported once, the script run as ``__main__``, the interpreter's own exit)."""

    def __init__(self, mode: str, port: int, rank: int, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        os.mkfifo(folder / "release")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = zygote.spawn([str(SCRIPT), mode, str(port), str(rank), str(folder)], env)
        self._output: str | None = None

    def reached(self, step: str, within: float = START) -> None:
        deadline = time.monotonic() + within
        while not (self.folder / step).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the child ended before {step}: {self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the child did not reach {step} within {within:g} s")
            time.sleep(0.01)

    def release(self) -> None:
        fd = os.open(self.folder / "release", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    def finish(self, within: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the child did not end within {within:g} s") from None

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        if self._output is None:  # read to its end: the child and what it started closed it
            self._output = self.proc.communicate(timeout=30)[0].decode(errors="replace")
        return self._output

    def end(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        try:  # its session: the child, and anything it started
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.output()  # closes the pipe


@pytest.fixture
def children(tmp_path: Path, server: Any) -> Iterator[Any]:
    started: list[Child] = []

    def start(mode: str, rank: int = 1) -> Child:
        child = Child(mode, server.port, rank, tmp_path / f"rank{rank}")
        started.append(child)
        return child

    yield start
    for child in started:
        child.end()


# -- real processes -------------------------------------------------------------------


def test_a_sleeping_rank_names_the_user_function_it_is_in(server: Any, children: Any) -> None:
    child = children("sleep")
    child.reached("load_batch")
    began = time.monotonic()
    report = fetch_stacks(server, PREFIX, [1], timeout=5.0)[1]
    took = time.monotonic() - began
    assert report.answered, report.reason
    assert report.frame == (str(SCRIPT), waits_at("load_batch"), "load_batch")
    assert not report.in_syncdeco
    assert report.pid == child.proc.pid
    assert report.stack is not None
    assert report.stack.startswith("Most recent call last:")
    assert "os.read(fd, 1)  # waits: load_batch" in report.stack
    assert "in <module>" in report.stack  # the whole stack, outermost first
    where = report.where()
    assert "load_batch" in where and f"{SCRIPT}:{waits_at('load_batch')}" in where
    print(f"one rank answered in {took * 1000:.1f} ms")
    child.release()
    assert child.finish() == 0, child.output()


def test_ranks_asked_together_answer_together_and_so_do_askers(server: Any, children: Any) -> None:
    ranks = [1, 2, 3]
    started = [children("sleep", rank) for rank in ranks]
    for child in started:
        child.reached("load_batch")
    # Two askers at once, each on its own connection, as two waiting ranks do.
    got: dict[str, dict[int, _stacks.StackReport]] = {}

    def ask(name: str) -> None:
        got[name] = fetch_stacks(connect(server), PREFIX, ranks, timeout=5.0)

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(got) == {"a", "b"}
    for reports in got.values():
        assert sorted(reports) == ranks
        for rank, child in zip(ranks, started, strict=True):
            assert reports[rank].frame == (str(SCRIPT), waits_at("load_batch"), "load_batch")
            assert reports[rank].pid == child.proc.pid
    for child in started:
        child.release()
        assert child.finish() == 0, child.output()


def test_a_rank_holding_the_gil_is_reported_as_not_answering(server: Any, children: Any) -> None:
    child = children("gil")
    child.reached("decode_huge")
    began = time.monotonic()
    report = fetch_stacks(server, PREFIX, [1], timeout=1.0)[1]
    took = time.monotonic() - began
    assert not report.answered
    assert report.reason is not None
    assert "did not answer within 1 s" in report.reason
    assert "holds the GIL in a long C call" in report.reason
    assert f"py-spy dump --pid {child.proc.pid}" in report.reason
    assert report.pid == child.proc.pid
    assert took < 1.0 + 5.0, took  # the timeout and a margin: it did not hang
    child.release()
    assert child.finish() == 0, child.output()


def test_a_stopped_rank_is_reported_as_stopped(server: Any, children: Any) -> None:
    child = children("sleep")
    child.reached("load_batch")
    stop(child.proc.pid)
    try:
        began = time.monotonic()
        report = fetch_stacks(server, PREFIX, [1], timeout=1.0)[1]
        took = time.monotonic() - began
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
    assert not report.answered, (report.pid, child.proc.pid, report.stack)
    assert report.reason is not None
    assert report.where().startswith("did not answer within 1 s: its process is stopped (SIGSTOP")
    assert took < 1.0 + 5.0, took
    child.release()
    assert child.finish() == 0, child.output()


def test_a_rank_without_a_responder_is_named_as_such(server: Any) -> None:
    report = fetch_stacks(server, PREFIX, [7], timeout=0.2)[7]
    assert not report.answered
    assert report.reason is not None and "no stack responder" in report.reason


def test_a_late_reply_is_not_taken_for_a_later_request(server: Any, children: Any) -> None:
    child = children("phases")
    child.reached("phase_one")
    stop(child.proc.pid)
    try:
        first = fetch_stacks(server, PREFIX, [1], timeout=0.5)[1]
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
    assert not first.answered, (first.pid, child.proc.pid, first.stack)
    # Resumed, the child answers that first request late, from phase_one.
    late = _stacks._Keys(PREFIX, 1).reply(1)
    server.wait([late], timedelta(seconds=START))
    stale = server.get(_stacks._Keys(PREFIX, 1).stack(int(server.get(late))))
    assert b"phase_one" in stale
    child.release()
    child.reached("phase_two")
    second = fetch_stacks(server, PREFIX, [1], timeout=5.0)[1]
    assert second.answered, second.reason
    assert second.frame == (str(SCRIPT), waits_at("phase_two"), "phase_two")
    child.release()
    assert child.finish() == 0, child.output()


def test_a_process_with_a_responder_exits_promptly(server: Any, children: Any) -> None:
    child = children("exit")
    child.reached("finish")
    # It has answered once, so its responder is back in its long wait.
    assert fetch_stacks(server, PREFIX, [1], timeout=5.0)[1].answered
    child.release()
    began = time.monotonic()
    status = child.finish(within=30.0)
    took = time.monotonic() - began
    assert status == 0, child.output()
    assert took < 10.0, took  # a hang would take the responder's day-long wait
    output = child.output()
    assert "Traceback" not in output and "terminate" not in output, output


def test_a_process_serving_its_own_store_exits_cleanly(children: Any) -> None:
    # The store's server ends as the interpreter finalizes; a responder still
    # waiting on it then would abort the process from torch's C++ frames.
    child = children("host")
    child.reached("finish")
    child.release()
    status = child.finish(within=30.0)
    output = child.output()
    assert status == 0, output
    assert "terminate" not in output, output


def test_a_process_asked_for_its_stack_as_it_exits_ends_cleanly(server: Any, children: Any) -> None:
    # Requests keep coming while the child exits: none may catch its
    # responder in a store call when the interpreter finalizes.
    child = children("exit")
    child.reached("finish")
    asking = threading.Event()
    asked = [0]

    def ask() -> None:
        store = connect(server)
        while child.proc.poll() is None:
            fetch_stacks(store, PREFIX, [1], timeout=0.05)
            asked[0] += 1
            asking.set()

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        assert asking.wait(60)
        child.release()
        status = child.finish(within=30.0)
    finally:
        asker.join(60)
    output = child.output()
    assert status == 0, output
    assert "terminate" not in output, output
    assert asked[0] > 1


def test_a_responder_stops_quietly_when_the_store_goes(tmp_path: Path) -> None:
    # The store is served by a child; this process's responder waits on it.
    code = (
        "import sys, time, datetime, torch.distributed as d\n"
        "s = d.TCPStore('127.0.0.1', 0, 1, True, datetime.timedelta(seconds=30),"
        " wait_for_workers=False)\n"
        "print(s.port, flush=True)\n"
        "sys.stdin.read()\n"
    )
    host = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None and host.stdin is not None
        port = int(host.stdout.readline())
        store = dist.TCPStore("127.0.0.1", port, 1, False, timedelta(seconds=30))
        responder = StackResponder(store, "quiet", 0)
        responder.start()
        answering(dist.TCPStore("127.0.0.1", port, 1, False, timedelta(seconds=30)), "quiet")
        host.stdin.close()
        assert host.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while responder.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not responder.running
        responder.close()
        responder.close()
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(timeout=30)
        for stream in (host.stdin, host.stdout):
            if stream is not None:
                stream.close()


# -- in this process ------------------------------------------------------------------


def test_a_rank_at_syncdeco_code_of_its_own_says_so(server: Any) -> None:
    responder = StackResponder(connect(server), "self", 0)
    responder.start()
    ring = connect(server)
    try:
        answering(ring, "self")
        line = sys._getframe().f_lineno + 1
        report = fetch_stacks(connect(server), "self", [0], timeout=5.0)[0]
        assert report.answered, report.reason
        # The main thread is inside fetch_stacks, syncdeco's code.
        assert report.in_syncdeco
        name = sys._getframe().f_code.co_name
        assert report.frame == (__file__, line, name)
        assert report.where().startswith("is at a syncdeco sync point of its own, called in")
    finally:
        responder.close(ring=ring)
    deadline = time.monotonic() + 30
    while responder.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not responder.running  # the ring woke it, and it ended
    report = fetch_stacks(ring, "self", [0], timeout=0.1)[0]
    assert report.reason is not None and "no stack responder" in report.reason


def test_the_store_host_ends_every_responder_before_its_store_goes(server: Any) -> None:
    # Ranks 1 and 2 wait on the host's store; rank 3 said it started and
    # was killed since (it never stops); rank 4 starts once the job ended.
    host = connect(server)
    responders = {r: StackResponder(connect(server), "end", r) for r in (1, 2)}
    for rank, responder in responders.items():
        responder.start()
        answering(host, "end", rank)
    host.append("end/started", "3,")
    began = time.monotonic()
    assert _stacks.end_responders(host, "end", skip=(0,), timeout=0.5) == [3]
    assert time.monotonic() - began < 5.0
    for responder in responders.values():
        # Each made its last store call (the "off" mark) before the host
        # returned: none is left in a wait on the store.
        assert not responder.running
    assert host.check(["end/1/off", "end/2/off"]) and not host.check(["end/3/off"])
    # Skipped ranks are not waited for: the killed rank, once known, costs nothing.
    began = time.monotonic()
    assert _stacks.end_responders(host, "end", skip=(0, 3)) == []
    assert time.monotonic() - began < 0.4
    late = StackResponder(connect(server), "end", 4)
    late.start()
    deadline = time.monotonic() + 30
    while late.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not late.running and host.check(["end/4/off"])  # it saw `end` as it started


class Counting:
    """A store connection that counts the requests made through it."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return call


def test_an_idle_responder_makes_no_store_requests(server: Any) -> None:
    store = Counting(connect(server))
    responder = StackResponder(store, "idle", 0)
    responder.start()
    ring = connect(server)
    try:
        answering(ring, "idle")
        assert fetch_stacks(ring, "idle", [0], timeout=5.0)[0].answered
        # Starting: its last request served, an old "off" mark deleted, who
        # it is, that it started, whether the store's host has ended it.  One
        # round: the wait that woke, the bell deleted, whether it was ended,
        # the counter read, the stack, the replies, the served mark, and the
        # next wait (which may come just after the asker has its answer).
        deadline = time.monotonic() + 30
        while len(store.calls) < 13 and time.monotonic() < deadline:
            time.sleep(0.01)
        answered = list(store.calls)
        assert answered[:6] == ["check", "delete_key", "set", "append", "check", "wait"]
        assert answered[6:] == ["delete_key", "check", "add", "set", "multi_set", "set", "wait"]
        time.sleep(1.0)  # a window to look at, not an ordering
        assert store.calls == answered  # blocked in one wait: no polling
    finally:
        responder.close(ring=ring)


def test_main_thread_stack_from_another_thread() -> None:
    got: list[str] = []
    ready, done = threading.Event(), threading.Event()

    def read() -> None:
        ready.wait(30)
        got.append(main_thread_stack())
        done.set()

    thread = threading.Thread(target=read)
    thread.start()
    ready.set()
    assert done.wait(30)  # the main thread waits here while the other reads its stack
    thread.join(30)
    assert "test_main_thread_stack_from_another_thread" in got[0]
    assert "done.wait(30)" in got[0]
    frame = innermost_user_frame(got[0])
    assert frame is not None and frame[0] == __file__
    assert frame[2] == "test_main_thread_stack_from_another_thread"


def test_main_thread_stack_keeps_the_innermost_frames() -> None:
    def deep(n: int) -> str:
        return deep(n - 1) if n else main_thread_stack(limit=5)

    text = deep(20)
    assert text.count('  File "') == 5
    assert "outer frame(s) left out" in text
    assert "in deep" in text


# -- whose code a frame is --------------------------------------------------------------


def _site_packages_file() -> str:
    return pytest.__file__


USER = ("/home/me/project/train.py", 42, "load_batch")


@pytest.mark.parametrize(
    "inner",
    [
        pytest.param((threading.__file__, 320, "wait"), id="stdlib"),
        pytest.param((traceback.__file__, 1, "extract"), id="stdlib-2"),
        pytest.param(("<frozen importlib._bootstrap>", 1, "_find_and_load"), id="frozen"),
        pytest.param((_site_packages_file(), 1, "main"), id="site-packages"),
        pytest.param((torch.__file__, 1, "load"), id="torch"),
        pytest.param((torch.distributed.__file__, 1, "barrier"), id="torch-distributed"),
        pytest.param((syncdeco.__file__, 1, "barrier"), id="syncdeco"),
        pytest.param((_stacks.__file__, 1, "fetch_stacks"), id="syncdeco-module"),
        pytest.param(
            ("/opt/conda/lib/python3.10/selectors.py", 1, "select"), id="stdlib-other-host"
        ),
        pytest.param(
            ("/venv/lib/python3.12/site-packages/wrapt/wrappers.py", 1, "__call__"),
            id="site-packages-other-host",
        ),
        pytest.param(("/usr/lib/python3/dist-packages/numpy/core.py", 1, "f"), id="dist-packages"),
        pytest.param(("/elsewhere/src/syncdeco/_torch.py", 1, "sync"), id="syncdeco-other-host"),
    ],
)
def test_innermost_user_frame_skips_what_is_not_the_users(inner: tuple[str, int, str]) -> None:
    outer = ("/home/me/project/main.py", 7, "<module>")
    assert innermost_user_frame([outer, USER, inner, inner]) == USER


def test_innermost_user_frame_takes_the_innermost_of_the_users_frames() -> None:
    helper = ("/home/me/project/data.py", 9, "read_shard")
    assert innermost_user_frame([USER, helper]) == helper
    assert innermost_user_frame([("<string>", 1, "<module>")]) == ("<string>", 1, "<module>")
    assert innermost_user_frame([(threading.__file__, 1, "run")]) is None
    assert innermost_user_frame([]) is None


def test_innermost_user_frame_reads_every_kind_of_stack() -> None:
    summary = traceback.StackSummary.from_list(
        [(*USER, None), (threading.__file__, 1, "wait", None)]
    )
    assert innermost_user_frame(summary) == USER
    assert innermost_user_frame([(*USER, "x = 1")]) == USER  # (file, line, function, source)
    text = "".join(summary.format())
    assert innermost_user_frame(text) == USER
    assert innermost_user_frame(_stacks._format([(*USER, None)], 1)) == USER
