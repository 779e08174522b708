"""The death watch, on real processes: every way a process ends is reported
within seconds, and a live process (stopped, or holding its GIL in a C call)
never is.  Events are ordered with the children's own output and with a
"canary" process whose reported death proves the watch thread has looked."""

from __future__ import annotations

import errno
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from syncdeco._plane.deathwatch import DeathWatch, identity, watchable

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="pidfds are Linux-only (5.3+)"
)

BOUND = 5.0  # seconds: the product promise ("named within 5 seconds")
WAIT = 60.0  # seconds: the most any wait in this file lasts (a loaded machine)

# A child that says it is up, then waits for a line on stdin and ends as told.
_WAIT_THEN = "import sys; print('ready', flush=True); sys.stdin.readline(); {end}"


class Deaths:
    """The on_death callback: records each call with its time."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []
        self._cond = threading.Condition()

    def __call__(self, rank: int) -> None:
        with self._cond:
            self.calls.append((rank, time.monotonic()))
            self._cond.notify_all()

    @property
    def ranks(self) -> list[int]:
        with self._cond:
            return [rank for rank, _ in self.calls]

    def wait(self, *ranks: int, timeout: float = WAIT) -> float:
        """Wait until every rank in ``ranks`` is reported; the last one's time."""
        with self._cond:
            assert self._cond.wait_for(
                lambda: set(ranks) <= {r for r, _ in self.calls}, timeout=timeout
            ), f"ranks {sorted(set(ranks) - set(self.ranks))} not reported within {timeout} s"
            return max(t for r, t in self.calls if r in ranks)


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[str]]]:
    """Start child processes; every one is killed and reaped at the end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def watch() -> Iterator[tuple[DeathWatch, Deaths]]:
    deaths = Deaths()
    w = DeathWatch(deaths, name="syncdeco-deathwatch-test")
    yield w, deaths
    w.close()
    assert not _threads("syncdeco-deathwatch-test")


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def _python(procs: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    procs.append(proc)
    return proc


def _cat(procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """A small process that ends when its stdin is closed."""
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    procs.append(proc)
    return proc


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()  # the child exits within WAIT or is killed


def _send(proc: subprocess.Popen[str], text: str = "\n") -> None:
    assert proc.stdin is not None
    proc.stdin.write(text)
    proc.stdin.flush()


# -- every way a process ends is reported --------------------------------


@pytest.mark.parametrize(
    ("end", "returncode"),
    [
        ("import os; os._exit(3)", 3),
        ("import ctypes; ctypes.string_at(0)", -signal.SIGSEGV),
        ("raise SystemExit(0)", 0),
    ],
    ids=["os._exit", "segfault", "normal-exit"],
)
def test_an_ending_process_is_reported(watch, spawn, end, returncode):
    w, deaths = watch
    proc = _python(spawn, _WAIT_THEN.format(end=end))
    assert _line(proc) == "ready"
    assert w.watch(4, proc.pid)
    began = time.monotonic()
    _send(proc)
    seen = deaths.wait(4)
    assert proc.wait(timeout=WAIT) == returncode
    assert seen - began < BOUND
    assert deaths.ranks == [4]


def test_a_sigkilled_process_is_reported_within_the_bound(watch, spawn):
    w, deaths = watch
    procs = [_cat(spawn) for _ in range(3)]
    for rank, proc in enumerate(procs):
        assert w.watch(rank, proc.pid)
    began = time.monotonic()
    procs[1].kill()
    assert deaths.wait(1) - began < BOUND
    assert procs[1].wait(timeout=WAIT) == -signal.SIGKILL
    procs[0].kill()
    deaths.wait(0)
    assert deaths.ranks == [1, 0]  # the live one is not reported


def test_a_process_already_gone_is_reported(watch, spawn):
    w, deaths = watch
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=WAIT)  # ended and reaped: its pid names nobody now
    assert w.watch(2, gone.pid)
    deaths.wait(2)

    zombie = _cat(spawn)  # ended but not reaped: still a process, but over
    assert zombie.stdin is not None
    zombie.stdin.close()
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
    assert w.watch(3, zombie.pid)
    deaths.wait(3)
    assert deaths.ranks == [2, 3]


# -- no false alarm -------------------------------------------------------

_HOLD_GIL = """
import ctypes, sys, threading, time
ticks = []
def tick():
    while True:
        ticks.append(time.monotonic())
        time.sleep(0.01)
threading.Thread(target=tick, daemon=True).start()
while len(ticks) < 3:
    time.sleep(0.01)
hold = ctypes.PyDLL(None).sleep  # a C call made through PyDLL keeps the GIL
print("holding", flush=True)
start = time.monotonic()
hold(3)
end = time.monotonic()
# The ticks inside the 3 s, away from its edges (where the thread may run
# while the call is being made or has just returned, on a busy machine).
print("done", sum(start + 0.1 < t < end - 0.1 for t in list(ticks)), flush=True)
sys.stdin.readline()
"""


def test_a_process_holding_its_gil_is_not_reported(watch, spawn):
    w, deaths = watch
    proc = _python(spawn, _HOLD_GIL)
    canary = _cat(spawn)
    assert w.watch(0, proc.pid)
    assert _line(proc) == "holding"
    done, silent_ticks = _line(proc).split()
    assert done == "done"
    assert int(silent_ticks) == 0, "the child's own threads ran: its GIL was not held"
    # The child is alive after 3 s with its GIL held; the canary's report
    # proves the watch thread looked after that.
    assert w.watch(1, canary.pid)
    canary.kill()
    deaths.wait(1)
    assert deaths.ranks == [1]
    _send(proc)  # now it ends normally: that is a death to report
    deaths.wait(0)
    assert proc.wait(timeout=WAIT) == 0


def test_a_stopped_process_is_not_reported(watch, spawn):
    w, deaths = watch
    proc = _python(spawn, _WAIT_THEN.format(end="pass"))
    canary = _cat(spawn)
    assert _line(proc) == "ready"
    assert w.watch(0, proc.pid)
    assert w.watch(1, canary.pid)
    os.kill(proc.pid, signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    canary.kill()
    deaths.wait(1)
    assert deaths.ranks == [1]  # stopped, watched since before the stop, not reported
    os.kill(proc.pid, signal.SIGCONT)
    _, status = os.waitpid(proc.pid, os.WCONTINUED)
    assert os.WIFCONTINUED(status)
    _send(proc)
    deaths.wait(0)
    assert proc.wait(timeout=WAIT) == 0
    assert deaths.ranks == [1, 0]


# -- the watch itself ----------------------------------------------------


def test_fifty_processes_each_reported_once(watch, spawn):
    w, deaths = watch
    procs = [_cat(spawn) for _ in range(50)]
    for rank, proc in enumerate(procs):
        assert w.watch(rank, proc.pid)
        assert w.watch(rank, proc.pid)  # watching again changes nothing
    for rank, proc in enumerate(procs):
        if rank % 2:
            proc.kill()
        else:
            assert proc.stdin is not None
            proc.stdin.close()
    deaths.wait(*range(50))
    assert sorted(deaths.ranks) == list(range(50))
    assert w.watch(7, procs[7].pid)  # a reported rank stays reported
    assert w.unwatched == frozenset()


def test_the_idle_thread_never_wakes(watch, spawn):
    w, deaths = watch
    procs = [_cat(spawn) for _ in range(8)]
    for rank, proc in enumerate(procs):
        assert w.watch(rank, proc.pid)
    procs[7].kill()
    deaths.wait(7)  # the thread has taken in every watch and reported
    (thread,) = _threads("syncdeco-deathwatch-test")
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + WAIT
    while not _asleep_in_poll(task):  # back in poll() after the report (not waiting for the GIL)
        assert time.monotonic() < deadline, "the watch thread never went back to poll()"
        time.sleep(0.01)
    before = _switches(task)
    time.sleep(1.0)  # an observation window, not a synchronisation
    assert _switches(task) == before, "the watch thread woke up while nothing happened"
    assert deaths.ranks == [7]


# poll and ppoll, where the kernel has them
_POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}.get(platform.machine(), set())


def _asleep_in_poll(task: str) -> bool:
    with open(f"{task}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    with open(f"{task}/wchan") as f:
        wchan = f.read()
    with open(f"{task}/syscall") as f:
        syscall = f.read().split()[0]
    return state == "S" and ("poll" in wchan or syscall in _POLL_SYSCALLS)


def _switches(task: str) -> tuple[str, ...]:
    with open(f"{task}/status") as f:
        return tuple(line for line in f if "ctxt_switches" in line)


def test_watching_a_rank_with_a_new_pid_follows_the_new_process(watch, spawn):
    w, deaths = watch
    old, new = _cat(spawn), _cat(spawn)
    assert w.watch(0, old.pid)
    assert w.watch(0, new.pid)
    old.kill()
    assert old.wait(timeout=WAIT) == -signal.SIGKILL
    canary = _cat(spawn)
    assert w.watch(1, canary.pid)
    canary.kill()
    deaths.wait(1)
    assert deaths.ranks == [1]
    new.kill()
    deaths.wait(0)
    assert deaths.ranks == [1, 0]


def test_close_stops_the_thread_and_is_idempotent(spawn):
    deaths = Deaths()
    w = DeathWatch(deaths, name="syncdeco-deathwatch-close")
    w.close()  # before any thread: fine
    assert not w.watch(0, _cat(spawn).pid)

    w = DeathWatch(deaths, name="syncdeco-deathwatch-close")
    procs = [_cat(spawn) for _ in range(3)]
    for rank, proc in enumerate(procs):
        assert w.watch(rank, proc.pid)
    assert _threads("syncdeco-deathwatch-close")
    w.close()
    assert not _threads("syncdeco-deathwatch-close")
    w.close()
    assert not w.watch(5, procs[0].pid)
    procs[0].kill()
    assert procs[0].wait(timeout=WAIT) == -signal.SIGKILL
    assert deaths.ranks == []


def test_close_from_on_death_and_a_raising_on_death(spawn, caplog):
    caplog.set_level(logging.DEBUG, logger="syncdeco")
    deaths = Deaths()

    def on_death(rank: int) -> None:
        deaths(rank)
        if rank == 0:
            raise RuntimeError("boom in on_death")
        w.close()

    w = DeathWatch(on_death, name="syncdeco-deathwatch-self-close")
    procs = [_cat(spawn) for _ in range(3)]
    for rank, proc in enumerate(procs):
        assert w.watch(rank, proc.pid)
    (thread,) = _threads("syncdeco-deathwatch-self-close")
    procs[0].kill()
    deaths.wait(0)
    procs[1].kill()
    deaths.wait(1)  # still reporting after on_death raised; then it closes itself
    thread.join(timeout=WAIT)
    assert not thread.is_alive()
    assert not w.watch(2, procs[2].pid)
    assert "on_death(0) raised" in caplog.text
    assert "boom in on_death" in caplog.text
    assert deaths.ranks == [0, 1]


def test_a_forked_child_does_not_inherit_the_watch(watch, spawn):
    w, deaths = watch
    proc = _cat(spawn)
    assert w.watch(0, proc.pid)
    held = list(w._polled) or list(w._added.values())
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 0
        try:
            if w.watch(1, os.getppid()):
                code |= 1
            if _threads("syncdeco-deathwatch-test"):
                code |= 2
            for fd in held:
                try:
                    os.fstat(fd)
                    code |= 4
                except OSError as e:
                    if e.errno != errno.EBADF:
                        code |= 8
        finally:
            os._exit(code)
    deadline = time.monotonic() + WAIT
    while not (status := os.waitpid(pid, os.WNOHANG))[0]:
        assert time.monotonic() < deadline, "the forked child did not end"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status[1]) == 0
    proc.kill()  # the parent still watches
    deaths.wait(0)
    assert deaths.ranks == [0]


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM, errno.EMFILE])
def test_without_pidfds_watch_says_so_and_raises_nothing(monkeypatch, watch, err):
    w, deaths = watch

    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "pidfd_open", refuse)
    assert not w.watch(3, os.getpid())
    assert w.unwatched == {3}
    monkeypatch.delattr(os, "pidfd_open")
    assert not w.watch(4, os.getpid())
    assert w.unwatched == {3, 4}
    assert deaths.ranks == []


# -- who can watch whom ---------------------------------------------------


def test_identity_names_the_kernel_the_namespace_and_the_pid():
    host, pid_ns, pid = identity()
    assert pid == os.getpid()
    assert pid_ns == os.stat("/proc/self/ns/pid").st_ino
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert host.endswith("/" + f.read().strip())
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from syncdeco._plane.deathwatch import identity; print(identity())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT,
    )
    other = eval(child.stdout)  # a tuple's repr
    assert other[:2] == (host, pid_ns) and other[2] != pid
    assert watchable(identity(), {0: identity(), 1: other}) == {1: other[2]}


def test_watchable_needs_the_same_kernel_and_pid_namespace():
    me = ("node1/boot-a", 4026531836, 100)
    others = {
        0: me,  # this process
        1: ("node1/boot-a", 4026531836, 101),  # a sibling
        2: ("node2/boot-b", 4026531836, 102),  # another host, same initial pidns number
        3: ("node1/boot-b", 4026531836, 103),  # same name, another kernel
        4: ("node1/boot-a", 4026532000, 104),  # a container with its own pid namespace
        5: ("node1/boot-a", 4026531836, 105),
    }
    assert watchable(me, others) == {1: 101, 5: 105}
    assert watchable(("mac", 0, 100), {1: ("mac", 0, 101)}) == {}
    assert watchable(me, {}) == {}
