"""Start a script's ranks as real processes without each importing torch.

Importing torch costs about two seconds of CPU, and a test that starts three
ranks as fresh interpreters spends most of its time there.  The zygote is one
interpreter that imports torch and syncdeco once, then forks a process per
request; the forked process sets the environment, argv and stdout it was
given, runs the script as ``__main__`` and ends the way a fresh interpreter
does: the exception or ``sys.exit`` leaves the script and reaches the top of
this module, so the interpreter's own exit runs (``sys.excepthook``, the
threads' shutdown, ``atexit``, the exit status).  Nothing of the job exists
before the fork: no process group, no store, no launcher variables; the
rank is its own process and session (``os.setsid``), killed with
``os.killpg`` as any other.  Only the interpreter's start is shared, so a
test of what happens at interpreter start needs a fresh one.

The test side is :func:`spawn`, which returns a :class:`Forked` that
``communicate``, ``wait``, ``pid`` and ``returncode`` like a ``Popen``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

_MAX = 1 << 20  # bytes of one request: an environment and an argv


def _serve(sock: socket.socket) -> dict[str, object] | None:
    """Fork a child per request on ``sock`` and report each child's pid and,
    once reaped, its wait status.  Returns the request in a child; returns
    None in the zygote when the test side has closed ``sock``."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 4096)
                continue
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX, 1)
            if not data:
                return None
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sel.close()
                os.close(wake_r)
                os.close(wake_w)
                request: dict[str, object] = json.loads(data)
                request["fd"] = fds[0]
                sock.close()
                return request
            os.close(fds[0])
            sock.send(json.dumps({"pid": pid}).encode())
        while True:  # reap every child that has ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            sock.send(json.dumps({"exit": pid, "status": status}).encode())


def _become(request: dict[str, object]) -> None:
    """In the forked child: become the process a launcher would have started."""
    import runpy
    import tempfile

    os.setsid()
    fd = int(request["fd"])  # type: ignore[call-overload]
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    node = request.get("node")
    if node is not None:
        _enter_node(node)  # type: ignore[arg-type]
    os.environ.clear()
    os.environ.update(request["env"])  # type: ignore[arg-type]
    tempfile.tempdir = None  # read TMPDIR again
    if request.get("cwd") is not None:
        os.chdir(str(request["cwd"]))
    argv: list[str] = request["argv"]  # type: ignore[assignment]
    sys.argv = list(argv)
    # as `python SCRIPT` does: argv[0] as given, the script's __file__ (and
    # so its code's file name) absolute
    script = os.path.abspath(argv[0])
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")


_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWNET = 0x40000000
_MS_BIND, _MS_REC, _MS_SLAVE = 0x1000, 0x4000, 0x80000


def _enter_node(node: Mapping[str, str]) -> None:
    """In the forked child: be on a node of ``tests/netns.py``'s cluster as
    ``ip netns exec NS unshare --uts -- sh -c 'hostname H && exec ...'``
    makes a process be: in network namespace ``netns``, with a UTS
    namespace of its own named ``hostname``, and the namespace's files in
    ``/etc/netns/NS`` bound over ``/etc`` in a mount namespace of its own."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    ns = node["netns"]
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        check(libc.setns(fd, _CLONE_NEWNET), f"setns into {ns}")
    finally:
        os.close(fd)
    check(libc.unshare(_CLONE_NEWUTS | _CLONE_NEWNS), "unshare")
    # as ip netns exec: mounts made here stay here, and unmounts outside (an
    # `ip netns del` of another cluster) still reach here
    check(libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave /")
    etc = f"/etc/netns/{ns}"
    for name in sorted(os.listdir(etc)) if os.path.isdir(etc) else []:
        src, dst = f"{etc}/{name}".encode(), f"/etc/{name}".encode()
        check(libc.mount(src, dst, None, _MS_BIND, None), f"bind {etc}/{name}")
    socket.sethostname(node["hostname"])


class Forked:
    """A process the zygote forked, seen as a ``subprocess.Popen`` is: its
    ``pid`` (also its session), its output (stdout and stderr together) and
    its ``returncode`` (negative: the signal that ended it)."""

    def __init__(self, zygote: Zygote, pid: int, out: int) -> None:
        self.zygote, self.pid, self._out = zygote, pid, out
        self._read = b""
        self.returncode: int | None = None

    def communicate(self, timeout: float | None = None) -> tuple[bytes, None]:
        """Read the output to its end (every process holding it has closed
        it), then wait for the exit; ``subprocess.TimeoutExpired`` at
        ``timeout`` seconds, after which it can be called again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._out >= 0:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            with selectors.DefaultSelector() as sel:
                sel.register(self._out, selectors.EVENT_READ)
                if not sel.select(left):
                    continue
            chunk = os.read(self._out, 65536)
            if chunk:
                self._read += chunk
            else:
                os.close(self._out)
                self._out = -1
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        self.wait(left)
        return self._read, None

    def __del__(self) -> None:
        if self._out >= 0:  # a test that failed before reading it all
            os.close(self._out)

    def poll(self) -> int | None:
        """The exit status if the process has ended, else None, as
        ``Popen.poll`` gives it; never blocks."""
        if self.returncode is None:
            status = self.zygote.poll(self.pid)
            if status is not None:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, as ``Popen.wait`` gives it."""
        if self.returncode is None:
            status = self.zygote.status(self.pid, timeout)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Zygote:
    """The zygote process and the test's end of its socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours
        self._statuses: dict[int, int] = {}
        self._reading = threading.Lock()  # one thread at a time reads the socket

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        *,
        out: int | None = None,
        node: Mapping[str, str] | None = None,
    ) -> Forked:
        read, write = os.pipe() if out is None else (-1, out)
        try:
            cwd = None if cwd is None else os.fspath(cwd)
            request = {"argv": list(argv), "env": dict(env), "cwd": cwd, "node": node}
            socket.send_fds(self.sock, [json.dumps(request).encode()], [write])
        finally:
            if out is None:
                os.close(write)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            reply = self._receive(deadline - time.monotonic())
            if "pid" in reply:
                return Forked(self, reply["pid"], read)
        if read >= 0:
            os.close(read)
        raise RuntimeError(f"the zygote (pid {self.proc.pid}) forked nothing within 60 s")

    def status(self, pid: int, timeout: float | None) -> int:
        """The wait status of ``pid``; ``subprocess.TimeoutExpired`` if it
        has not ended within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._statuses:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(pid), timeout or 0.0)
            self._receive(left)
        return self._statuses.pop(pid)

    def poll(self, pid: int) -> int | None:
        """The wait status of ``pid`` if the zygote has reported it, else
        None; never blocks (while another thread reads the socket, it only
        looks at what has been read)."""
        while pid not in self._statuses and self._receive(0.0):
            pass
        return self._statuses.pop(pid, None)

    def _receive(self, timeout: float | None) -> dict[str, int]:
        """One message of the zygote ({} at the timeout, or when another
        thread is reading past it); exit statuses are kept for
        :meth:`status` and :meth:`poll`."""
        if not self._reading.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return {}
        try:
            self.sock.settimeout(timeout)
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return {}
        finally:
            self._reading.release()
        if not data:
            raise RuntimeError(f"the zygote (pid {self.proc.pid}) ended: {self.proc.poll()}")
        reply: dict[str, int] = json.loads(data)
        if "exit" in reply:
            self._statuses[reply["exit"]] = reply["status"]
        return reply

    def close(self) -> None:
        self.sock.close()  # the zygote returns from _serve and exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


_shared: Zygote | None = None


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    *,
    out: int | None = None,
    node: Mapping[str, str] | None = None,
) -> Forked:
    """Fork ``argv`` (a script and its arguments, no interpreter) with
    ``env`` (and in ``cwd``, else the zygote's) from this test process's
    zygote, started on first use and closed when the process exits.
    ``out``: a file descriptor for its output (stdout and stderr), else a
    pipe that ``communicate`` reads; ``node``: ``{"netns": ..., "hostname":
    ...}``, a node of ``netns.Cluster`` to start it on."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        import atexit

        _shared = Zygote()
        atexit.register(_shared.close)
    return _shared.spawn(argv, env, cwd, out=out, node=node)


if __name__ == "__main__":
    # the point: imported once, before any fork
    import torch
    import torch.distributed  # noqa: F401

    import syncdeco
    import syncdeco._frozen  # noqa: F401  (gc.freeze: a fork copies no page for the gc)

    _request = _serve(socket.socket(fileno=int(sys.argv[1])))
    if _request is not None:  # a forked child: from here on, the rank
        _become(_request)
