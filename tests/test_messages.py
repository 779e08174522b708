"""What a failure prints: on real ranks started as a launcher starts them,
each rank's traceback in one piece, prefixed with its rank, showing the
user's call, one frame of syncdeco, and the error; in one process, the
rules behind it (which frames are dropped, which call a message names)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import docs_output
import pytest
import torch.distributed as dist
from scripted import kill_all

import syncdeco as sd
from syncdeco._errors import FULL_TRACEBACK, NO_RESPONDER, shown
from syncdeco._excepthook import prefixed
from syncdeco.testing import launcher_env

SCRIPT = Path(__file__).parent / "scripts" / "first_failure.py"
SYNCDECO = Path(__file__).resolve().parent.parent / "syncdeco"
BOUND = 120.0  # seconds for the whole run


def _both_fail_at_the_first_sync_point(tmp_path: Path) -> tuple[list[int], str]:
    """The two ranks' exit statuses, and what they wrote to the stderr they
    share (one file, opened for appending, as a terminal is shared)."""
    # torchrun's variables: the ranks are clients of a store this test hosts,
    # as torchrun's agent hosts one; no process group exists before the run.
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, 2, is_master=True, wait_for_workers=False
    )
    shared = tmp_path / "stderr"
    procs = []
    with open(shared, "ab", buffering=0) as stderr:
        for rank in range(2):
            env = {
                **os.environ,
                **launcher_env("torchrun", rank, 2, 2),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "TMPDIR": str(tmp_path),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            )
        try:
            codes = [proc.wait(timeout=BOUND) for proc in procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks did not end within {BOUND}s:\n{shared.read_text()}")
        finally:
            kill_all(procs)
    return codes, shared.read_text()


def _traceback_of(rank: int, text: str) -> list[str]:
    """Rank ``rank``'s traceback: its prefixed lines, checked to be one run
    of lines that no other output cuts into."""
    prefix = f"[rank{rank}]: "
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert at, f"rank {rank} wrote no prefixed traceback:\n{text}"
    assert at == list(range(at[0], at[-1] + 1)), f"rank {rank}'s traceback is cut:\n{text}"
    assert lines[at[0]] == prefix + "Traceback (most recent call last):", text
    return [lines[i][len(prefix) :] for i in at]


def _frames(traceback: list[str]) -> list[str]:
    """The files of the traceback's frames, in order ('syncdeco' for the
    package's own)."""
    files = [m[1] for line in traceback if (m := re.match(r'  File "(.+?)", line \d+', line))]
    return ["syncdeco" if f.startswith(str(SYNCDECO)) else Path(f).name for f in files]


def test_each_rank_prints_one_whole_prefixed_traceback_at_the_first_sync_point(
    tmp_path: Path,
) -> None:
    codes, text = _both_fail_at_the_first_sync_point(tmp_path)
    assert codes == [1, 1], text
    # docs/errors.md shows what they print
    docs_output.check("tests/scripts/first_failure.py", text)

    # Rank 0's own error: its call, syncdeco's one frame, its body, the error.
    own = _traceback_of(0, text)
    assert _frames(own) == ["first_failure.py", "syncdeco", "first_failure.py"], text
    assert own[2] == "    download_dataset()", text
    assert own[-1] == "ConnectionError: HTTP 503 from the dataset mirror", text

    # Rank 1 heard of it: its call, syncdeco's one frame, the error.
    heard = _traceback_of(1, text)
    assert _frames(heard) == ["first_failure.py", "syncdeco"], text
    assert heard[2] == "    download_dataset()", text
    assert heard[-1].startswith(
        "syncdeco.PeerFailedError: rank 0 raised ConnectionError: HTTP 503 from the "
        "dataset mirror (seen by rank 1 at main_first '__main__.download_dataset'"
    ), text


# -- the same rules in one process, on a backend of the test's own -------------------


class _Recording:
    """A two-rank backend (rank 0's side) that records each sync point and
    raises ``error`` from the next one, if given."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.points: list[sd.SyncPoint] = []
        self.error = error

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 2

    def local_rank(self) -> int:
        return 0

    def sync(self, point: sd.SyncPoint, **kw: object) -> object:
        self.points.append(point)
        if self.error is not None:
            raise self.error
        return None


def _line_of(text: str) -> int:
    """The line of this file that holds ``text`` (once)."""
    lines = Path(__file__).read_text().splitlines()
    found = [n for n, line in enumerate(lines, 1) if text in line and "_line_of(" not in line]
    assert len(found) == 1, (text, found)
    return found[0]


@sd.barrier_after
def _step() -> str:
    return "stepped"


@sd.barrier_after
async def _step_async() -> str:
    return "stepped"


@pytest.mark.parametrize(
    "place, hint",
    [
        (None, True),  # no stack asked for
        (f"{NO_RESPONDER} (it has not reached its first sync point yet, or it has exited)", True),
        ("is in tokenize (train.py:12)", False),  # it said where it is
        ("did not answer within 1 s: its main thread may be in a long C call", False),
        ("did not answer: its process has exited (its stack responder has stopped)", False),
    ],
)
def test_the_init_hint_is_given_only_where_a_rank_could_not_say_where_it_is(
    place: str | None, hint: bool
) -> None:
    error = sd.SyncTimeoutError(
        missing=[0],
        point="main_first 'load' (call 1, train.py:10)",
        timeout=3.0,
        observer=1,
        last_seen={0: None},
        places={} if place is None else {0: place},
    )
    assert ("call sd.init() at the start of every rank" in str(error)) == hint
    assert ".." not in str(error)


def test_ranks_said_of_alike_are_said_of_once() -> None:
    # a 4096-rank job whose first sync point times out with most ranks not started
    never = f"{NO_RESPONDER} (it has not reached its first sync point yet, or it has exited)"
    missing = [3005, *range(1, 3000)]  # (a node's missing ranks come after the others)
    error = sd.SyncTimeoutError(
        missing=missing,
        point="barrier 'start' (call 1, train.py:5)",
        timeout=60.0,
        observer=0,
        last_seen={**dict.fromkeys(range(1, 3000)), 3005: "barrier 'load' (call 1, train.py:3)"},
        places={**dict.fromkeys(range(1, 3000), never), 3005: "is in read_shard (data.py:31)"},
    )
    assert error.missing == tuple(missing)
    said = "but rank(s) 1-2999, 3005 did not arrive: ranks 1-2999 (never seen at a sync point)"
    assert said + f": each {never}; rank 3005 " in str(error)
    assert "; rank 3005 (last seen at barrier 'load' (call 1, train.py:3)) is in read_shard" in (
        str(error)
    )
    assert len(str(error)) < 1000


def test_a_decorated_call_names_where_it_was_called() -> None:
    backend = _Recording()
    with sd.use_backend(backend):
        _step()  # the call site
    (point,) = backend.points
    here = f"test_messages.py:{_line_of('_step()  # the call site')}"
    assert point.called == here
    decorated = f"test_messages.py:{_line_of('def _step() -> str:') - 1}"
    assert point.describe() == (
        f"barrier_after '{__name__}._step' (call 1, {decorated}, called from {here})"
    )


def test_an_awaited_decorated_call_names_where_it_was_awaited() -> None:
    backend = _Recording()

    async def caller() -> None:
        await _step_async()  # the awaiting line

    with sd.use_backend(backend):
        asyncio.run(caller())
        # a task made right from the call: no caller of the user's to name
        asyncio.run(_step_async())
    awaited, task = backend.points
    assert awaited.called == f"test_messages.py:{_line_of('# the awaiting line')}"
    assert task.called == "" and "called from" not in task.describe()


def _syncdeco_frames(exc: BaseException) -> list[str]:
    tb, names = exc.__traceback__, []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(str(SYNCDECO)):
            names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def _timeout() -> sd.SyncTimeoutError:
    return sd.SyncTimeoutError(missing=(1,), point="p", timeout=1.0, observer=0)


def test_a_sync_error_is_raised_with_one_frame_of_syncdeco_in_every_face() -> None:
    faces: list[Callable[[], object]] = [
        _step,
        lambda: asyncio.run(_step_async()),
        lambda: sd.barrier("b"),
    ]

    def in_with() -> None:
        with sd.barrier_after():
            pass

    async def in_async_with() -> None:
        async with sd.barrier_after():
            pass

    faces += [in_with, lambda: asyncio.run(in_async_with())]
    for face in faces:
        error = _timeout()
        with sd.use_backend(_Recording(error)), pytest.raises(sd.SyncTimeoutError) as info:
            face()
        assert info.value is error
        # one of syncdeco's, then the backend's own frame (it raised it)
        assert len(_syncdeco_frames(error)) == 1, traceback.format_exception(error)
        assert info.traceback[-1].name == "sync"


def test_the_users_exception_keeps_its_frames_under_one_of_syncdecos() -> None:
    @sd.barrier_after
    def body() -> None:
        raise OSError("disk full")

    with sd.use_backend(_Recording()), pytest.raises(OSError) as info:
        body()
    assert _syncdeco_frames(info.value) == ["call"]
    assert info.traceback[-1].name == "body"


def _in_syncdeco(source: str, name: str) -> Callable[..., object]:
    """A function whose frames are syncdeco's, as far as a traceback tells."""
    space: dict[str, object] = {}
    exec(compile(source, str(SYNCDECO / "_pretend.py"), "exec"), space)
    return space[name]  # type: ignore[return-value]


def test_shown_drops_syncdecos_frames_down_to_other_code_but_not_a_bug_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as in syncdeco: an error caught in one of its frames (``advance``),
    # raised some frames further in
    inner = _in_syncdeco("def inner(make):\n    raise make()\n", "inner")
    outer = _in_syncdeco(
        "def outer(f, make):\n    try:\n        f(make)\n    except BaseException as e:\n"
        "        return e\n",
        "outer",
    )

    def caught(make: Callable[[], BaseException], through: Callable[..., object]) -> BaseException:
        exc = outer(through, make)
        assert isinstance(exc, BaseException)
        return exc

    def users(make: Callable[[], BaseException]) -> None:
        raise make()

    # syncdeco's own error, raised in its frames: none of them is left
    assert shown(caught(_timeout, inner)).__traceback__ is None
    # raised in other code under syncdeco's frames: that code's frame is left
    left = shown(caught(lambda: OSError("x"), users)).__traceback__
    assert left is not None and left.tb_frame.f_code.co_name == "users"
    # not syncdeco's own, raised in its frames: a bug; every frame is kept
    bug = caught(lambda: AttributeError("oops"), inner)
    assert _syncdeco_frames(shown(bug)) == ["outer", "inner"]
    # SYNCDECO_FULL_TRACEBACK=1 keeps them all
    monkeypatch.setenv(FULL_TRACEBACK, "1")
    assert _syncdeco_frames(shown(caught(_timeout, inner))) == ["outer", "inner"]


def test_prefixed_writes_torchs_format() -> None:
    assert prefixed(3, "Traceback:\n  File x\n\nValueError: v\n") == (
        "[rank3]: Traceback:\n[rank3]:   File x\n\n[rank3]: ValueError: v\n"
    )


def test_the_prefix_is_written_once_after_torch_makes_its_group(tmp_path: Path) -> None:
    # syncdeco's hook first (a rank's first sync point), then torch's, which
    # wraps it: torch's prefix alone, once per line.
    script = (
        "import torch.distributed as dist\n"
        "from syncdeco._excepthook import install\n"
        "install(0)\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "raise ValueError('after the group')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if "rank0]" in line]
    assert lines[0] == "[rank0]: Traceback (most recent call last):", run.stderr
    assert lines[-1] == "[rank0]: ValueError: after the group", run.stderr
    assert not any("[rank0]: [rank0]" in line for line in lines), run.stderr
