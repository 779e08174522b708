"""Faults injected on real Gloo ranks: ranks killed at a chosen point,
failures in a row, and a checkpoint writer killed mid-save.  Every surviving
rank must raise the right error, naming the right ranks, and every process
must be gone at the end (the harness checks both)."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import syncdeco as sd
from syncdeco.testing import run_ranks


def _mark(tmp: Path, name: str) -> None:
    (tmp / name).write_text(str(sd.rank()))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# The ranks run on one host, so a killed rank is seen to end by the others
# (RankKilledError); the timeouts are long so that a timeout cannot pass for it.


def member_killed_before_barrier(tmp: Path) -> object:
    sd.barrier("start")
    if sd.rank() == 1:
        _die()
    try:
        sd.barrier("after the kill", timeout=60)
    except sd.RankKilledError as err:
        return err.rank, err.point.split(" (")[0]
    return "no error"


def test_killed_member_is_named_by_the_survivors(tmp_path: Path) -> None:
    outcomes = run_ranks(member_killed_before_barrier, 3, tmp_path, dies=(1,))
    assert outcomes[1].value == "killed"
    for rank in (0, 2):  # the main, and a member answered with its verdict
        assert outcomes[rank].unwrap() == (1, "barrier 'after the kill'")


def main_killed_while_others_wait(tmp: Path) -> object:
    sd.barrier("start")
    if sd.rank() == 0:
        _die()
    try:
        with sd.main_first(timeout=60):
            pass
    except sd.RankKilledError as err:
        return err.rank
    return "no error"


def test_killed_main_is_named_by_the_survivors(tmp_path: Path) -> None:
    outcomes = run_ranks(main_killed_while_others_wait, 3, tmp_path, dies=(0,))
    assert outcomes[0].value == "killed"
    assert [o.unwrap() for o in outcomes[1:]] == [0, 0]


def member_killed_inside_barrier_after(tmp: Path) -> object:
    @sd.barrier_after(timeout=2)
    def step() -> None:
        if sd.rank() == 2:
            _die()

    try:
        step()
    except sd.SyncTimeoutError as err:
        return err.missing
    return "no error"


def test_rank_killed_before_it_ever_joined_is_named_at_the_timeout(tmp_path: Path) -> None:
    # Rank 2 dies in its first body, before it reached any sync point: it
    # never said where it lives, so nobody watches its process (a known
    # limit), and the others name it at their timeout.
    outcomes = run_ranks(member_killed_inside_barrier_after, 4, tmp_path, dies=(2,))
    assert [o.value for o in outcomes] == [(2,), (2,), "killed", (2,)]


def member_killed_inside_barrier_after_once_joined(tmp: Path) -> object:
    sd.barrier("joined")

    @sd.barrier_after(timeout=60)
    def step() -> None:
        if sd.rank() == 2:
            _die()

    try:
        step()
    except sd.RankKilledError as err:
        return err.rank
    return "no error"


def test_rank_dying_inside_a_synced_function(tmp_path: Path) -> None:
    outcomes = run_ranks(member_killed_inside_barrier_after_once_joined, 4, tmp_path, dies=(2,))
    assert [o.value for o in outcomes] == [2, 2, "killed", 2]


ROUNDS = 30


def _what(err: BaseException) -> tuple[object, ...]:
    """What a rank can tell of the error it got, to compare across ranks."""
    if isinstance(err, sd.PeerFailedError):
        return (
            type(err).__name__,
            err.rank,
            err.exc_type,
            err.message,
            err.observer,
            err.out_of_step,
        )
    if isinstance(err, sd.SyncMismatchError):
        where = sorted((point.split(" (")[0], ranks) for point, ranks in err.points.items())
        return type(err).__name__, where, err.observer
    return type(err).__name__, str(err)


def failures_in_a_row(tmp: Path) -> list[tuple[object, ...]]:
    """30 failures of every kind on one group, each followed by a good sync.

    Each round ends at the barrier "good", which every rank reaches only
    after its own round, so no round's outcome depends on another's; within a
    round, the main rank's verdict reaches every rank.  A failing rank (in
    ``step``) and a rank at another barrier move from rank to rank."""

    @sd.barrier_after
    def step(i: int) -> None:
        if sd.rank() == (i // 4) % sd.world_size():
            raise RuntimeError(f"step {i}")

    @sd.main_first
    def load(i: int) -> None:
        raise OSError(f"load {i}")

    @sd.on_main_only(broadcast=True)
    def unpicklable() -> object:
        return lambda: None

    got: list[tuple[object, ...]] = []
    for i in range(ROUNDS):
        kind = i % 4
        try:
            if kind == 0:
                step(i)
            elif kind == 1:
                load(i)
            elif kind == 2:
                unpicklable()
            else:
                odd = sd.rank() == (i // 4) % sd.world_size()
                sd.barrier(f"a{i}" if odd else f"b{i}")
        except Exception as err:
            got.append(_what(err))
        else:
            raise AssertionError(f"round {i} raised nothing on rank {sd.rank()}")
        sd.barrier("good")
    return got


def _pickling_error() -> tuple[str, str]:
    """What pickle says of the lambda ``unpicklable`` returns (its words vary
    between Python versions)."""

    def unpicklable() -> object:
        return lambda: None

    local = unpicklable()
    name = "failures_in_a_row.<locals>.unpicklable.<locals>.<lambda>"
    local.__qualname__ = name  # type: ignore[attr-defined]
    try:
        pickle.dumps(local)
    except Exception as err:
        return type(err).__name__, str(err)
    raise AssertionError("a local lambda pickled")


def _expected(rank: int, world_size: int) -> list[tuple[object, ...]]:
    """What ``failures_in_a_row`` must get on ``rank``, round by round: the
    failing rank its own exception, every other rank PeerFailedError naming
    it (heard at this very sync point), and every rank the same mismatch."""
    rounds: list[tuple[object, ...]] = []
    for i in range(ROUNDS):
        kind, odd = i % 4, (i // 4) % world_size
        if kind == 3:
            others = tuple(r for r in range(world_size) if r != odd)
            where = sorted([(f"barrier 'a{i}'", (odd,)), (f"barrier 'b{i}'", others)])
            rounds.append(("SyncMismatchError", where, rank))
            continue
        if kind == 0:
            failing, error = odd, ("RuntimeError", f"step {i}")
        elif kind == 1:
            failing, error = 0, ("OSError", f"load {i}")  # the main rank goes first
        else:
            failing, error = 0, _pickling_error()  # the main rank's result
        if rank == failing:
            rounds.append(error)
        else:
            rounds.append(("PeerFailedError", failing, *error, rank, False))
    return rounds


def test_thirty_failures_in_a_row(tmp_path: Path) -> None:
    outcomes = run_ranks(failures_in_a_row, 4, tmp_path)
    for rank, outcome in enumerate(outcomes):
        assert outcome.unwrap() == _expected(rank, 4), f"rank {rank}"


# -- atomic_save -----------------------------------------------------------------------------

WRITER = r"""
import io, sys, time
from pathlib import Path
import torch
import syncdeco as sd

path, marker = Path(sys.argv[1]), Path(sys.argv[2])

def stalls_half_way(obj, f):
    data = io.BytesIO()
    torch.save(obj, data)
    raw = data.getvalue()
    f.write(raw[: len(raw) // 2])
    f.flush()
    marker.write_text("half written")
    while True:  # killed here
        time.sleep(1)

sd.atomic_save({"step": 2, "w": torch.ones(1000)}, path, save=stalls_half_way)
"""


def test_atomic_save_survives_a_writer_killed_mid_save(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    sd.atomic_save({"step": 1, "w": torch.zeros(1000)}, ckpt)
    marker = tmp_path / "marker"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():  # the writer says when it is half way
            assert writer.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never got half way"
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(10)
    assert writer.returncode == -signal.SIGKILL
    saved = torch.load(ckpt)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.zeros(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ckpt.pt", "marker")]
    assert all(name.startswith(".ckpt.pt.") for name in leftovers)  # only the dead temp file


def test_atomic_save_replaces_and_cleans_up(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    assert sd.atomic_save({"step": 1}, ckpt) == ckpt
    sd.atomic_save({"step": 2}, ckpt)
    assert torch.load(ckpt) == {"step": 2}

    def broken(obj: object, f: io.BufferedIOBase) -> None:
        f.write(b"partial")
        raise ValueError("serializer failed")

    with pytest.raises(ValueError, match="serializer failed"):
        sd.atomic_save({"step": 3}, ckpt, save=broken)
    assert torch.load(ckpt) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_save_into_a_missing_folder_names_the_path_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "no such folder" / "ckpt.pt"
    with pytest.raises(FileNotFoundError) as info:
        sd.atomic_save({"step": 1}, target)
    assert info.value.filename == str(target)
    assert str(info.value).startswith("[Errno 2] No such file or directory (atomic_save writes")
    assert not list(tmp_path.rglob("*.tmp"))


def test_atomic_save_gives_the_mode_open_would(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        fresh = sd.atomic_save({"step": 1}, tmp_path / "fresh.pt")
        assert fresh.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not 0600
        kept = tmp_path / "kept.pt"
        kept.write_bytes(b"old")
        kept.chmod(0o604)
        sd.atomic_save({"step": 2}, kept)
        assert kept.stat().st_mode & 0o777 == 0o604  # the file it replaced had this one
    finally:
        os.umask(old)


def test_atomic_save_where_the_mode_cannot_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, mode: int) -> None:
        raise PermissionError("this filesystem keeps its own modes")

    monkeypatch.setattr(os, "fchmod", refuse)
    open_fds = len(os.listdir("/proc/self/fd"))
    for step in range(5):
        sd.atomic_save({"step": step}, tmp_path / "ckpt.pt")
    assert len(os.listdir("/proc/self/fd")) == open_fds  # no descriptor left open
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
