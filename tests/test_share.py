"""Broadcast results once per node, and ``share=True``: on real Gloo ranks.

A broadcast result's tensors reach each node's main rank, which hands them
to its node through a file in shared memory (``syncdeco/_plane/pernode.py``).
Simulated nodes (``nodes=2``) are separate ranks on this machine that the
launcher's variables place on different nodes: they share nothing.  Events
are ordered with syncdeco's own sync points, never with sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scripted import kill_all

import syncdeco as sd
from syncdeco.testing import run_ranks

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _result() -> dict[str, Any]:
    import torch

    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "a": a,
        "again": a,  # the same tensor twice stays one tensor
        "t": a.t(),  # not contiguous
        "big": torch.arange(3 * 2**20 + 5, dtype=torch.float64),  # 24 MiB and 40 bytes
        "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "z": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64),
        "scalar": torch.tensor(7, dtype=torch.int16),
        "empty": torch.empty(0, 5),
        "p": torch.nn.Parameter(torch.ones(2)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "grad": torch.ones(3).requires_grad_(),
        "plain": ["text", 5],
    }


def _check(got: dict[str, Any]) -> None:
    import torch

    want = _result()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            mine = got[key]
            assert type(mine) is type(value), key
            assert mine.dtype == value.dtype and mine.shape == value.shape, key
            assert mine.requires_grad == value.requires_grad, key
            assert torch.equal(mine.detach(), value.detach()), key
        else:
            assert got[key] == value, key
    assert got["again"] is got["a"]


def results(share: bool) -> list[str | None]:
    """Every kind of tensor arrives intact; returns the file each tensor's
    memory is mapped from (None: private memory)."""
    import torch

    @sd.on_main_only(broadcast=True, share=share)
    def build() -> dict[str, Any]:
        return _result()

    got = build()
    _check(got)
    sd.barrier("checked")  # with share=True, a write here is seen by the node's ranks
    for value in got.values():
        if isinstance(value, torch.Tensor) and value.numel():
            value.detach()[(0,) * value.dim()].fill_(0)  # writable everywhere
    return [got[k].untyped_storage().filename for k in ("a", "big", "p")]


@pytest.mark.parametrize("share", [False, True], ids=["copy", "share"])
@pytest.mark.parametrize("nodes", [1, 2])
def test_tensor_results_arrive_intact(tmp_path: Path, share: bool, nodes: int) -> None:
    files = [o.unwrap() for o in run_ranks(results, 4, share, nodes=nodes)]
    if not share:
        assert files == [[None] * 3] * 4  # each rank its own memory
        return
    per_node = 4 // nodes
    for node in range(nodes):
        mine = files[node * per_node : (node + 1) * per_node]
        # one file per result on each node, mapped by every rank of that node
        assert all(f == mine[0] for f in mine), files
        assert all(name is not None for name in mine[0]), files
        assert len(set(mine[0])) == 1, files
    assert len({f[0] for f in files}) == nodes  # nodes share nothing


def writes(share: bool, local: bool) -> tuple[list[float], bool]:
    """Local rank 1 of each node writes into its result; after a barrier
    every rank reports what it sees, and whether it holds the main's own
    tensor object."""
    import torch

    mine = torch.zeros(4)

    @sd.on_main_only(broadcast=True, share=share, local=local)
    def build() -> torch.Tensor:
        return mine

    got = build()
    sd.barrier("built")
    if sd.local_rank() == 1:
        got[sd.rank() // 2] = 100.0 + sd.rank()  # a slot per node
    sd.barrier("written")
    return got.tolist(), got is mine


@pytest.mark.parametrize("local", [False, True], ids=["world", "local"])
def test_shared_tensors_are_one_memory_per_node(tmp_path: Path, local: bool) -> None:
    outcomes = [o.unwrap() for o in run_ranks(writes, 4, True, local, nodes=2)]
    node0, node1 = [101.0, 0.0, 0.0, 0.0], [0.0, 103.0, 0.0, 0.0]
    # rank 1's write is seen by rank 0 (the main, whose result is the shared
    # one, not the tensor its function returned), never by the other node
    assert outcomes == [(node0, False), (node0, False), (node1, False), (node1, False)]


def test_copies_are_private(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(writes, 4, False, False, nodes=2)]
    # the main keeps the very tensor its function returned, as before
    assert outcomes == [
        ([0.0] * 4, True),
        ([101.0, 0.0, 0.0, 0.0], False),
        ([0.0] * 4, False),
        ([0.0, 103.0, 0.0, 0.0], False),
    ]


def _mapped() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.split(None, 5)[-1].strip() for line in f if "/syncdeco-" in line]


def leftovers(tmp: Path) -> tuple[int, list[str], list[str], list[str], list[str]]:
    """What is mapped and what is left in /dev/shm, while the result is held
    and after it is dropped."""
    import torch

    @sd.on_main_only(broadcast=True, share=True)
    def build() -> torch.Tensor:
        return torch.ones(2**20)

    @sd.on_main_only(broadcast=True)
    def copied() -> torch.Tensor:
        return torch.ones(2**20)

    got = build()
    copy = copied()
    sd.barrier("every rank has its result")
    held = _mapped()
    files = sorted(glob.glob(f"{SHM}/syncdeco-*-{os.getpid()}-*"))
    (tmp / f"pid{sd.rank()}").write_text(str(os.getpid()))
    del got, copy
    gc.collect()
    return os.getpid(), held, files, _mapped(), sorted(glob.glob(f"{SHM}/syncdeco-*"))


@pytest.mark.skipif(SHM is None, reason="no /dev/shm here")
def test_no_file_is_left_in_dev_shm(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(leftovers, 4, tmp_path, nodes=2)]
    pids = [pid for pid, *_ in outcomes]
    for rank, (_, held, files, after, _) in enumerate(outcomes):
        # mapped while held, already unlinked (every rank of the node had it) ...
        assert len(held) == 1 and held[0].endswith("(deleted)"), (rank, held)
        assert files == [], (rank, files)
        # ... and unmapped once dropped: the memory goes back to the system
        assert after == [], (rank, after)
    # nothing of this job is in /dev/shm (other jobs on the machine may be)
    left = {f for *_, everything in outcomes for f in everything}
    assert not [f for f in left if any(f"-{pid}-" in f for pid in pids)]


def no_room(tmp: Path, share: bool) -> tuple[list[float], list[str], str | None]:
    """Rank 0 (the main, and its node's main) cannot write its node's file:
    its result was sent to the other node's main first.  Two sync points,
    so that the warning is seen to come once."""
    import logging

    import torch

    from syncdeco._plane import shm

    if sd.rank() == 0:
        shm.DIR = str(tmp / "missing")  # type: ignore[misc]
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("syncdeco").addHandler(handler)

    @sd.on_main_only(broadcast=True, share=share)
    def build() -> torch.Tensor:
        return torch.arange(5.0)

    got = build()
    again = build()
    assert torch.equal(got, again)
    return got.tolist(), said, got.untyped_storage().filename


@pytest.mark.parametrize("share", [False, True], ids=["copy", "share"])
def test_a_node_main_that_cannot_write_hands_on_through_the_store(
    tmp_path: Path, share: bool
) -> None:
    outcomes = [o.unwrap() for o in run_ranks(no_room, 4, tmp_path, share, nodes=2)]
    assert [got for got, *_ in outcomes] == [[0.0, 1.0, 2.0, 3.0, 4.0]] * 4
    (said, *others) = [s for _, s, _ in outcomes]
    assert others == [[], [], []], others
    assert len(said) == 1, said  # once, for two sync points
    assert said[0].startswith("syncdeco: rank 0 at on_main_only"), said
    assert f"@on_main_only(broadcast=True{', share=True' if share else ''})" in said[0]
    assert "FileNotFoundError" in said[0] and "--shm-size" in said[0], said
    assert "through the store" in said[0], said
    files = [f for *_, f in outcomes]
    # node 0 got copies through the store; node 1 still shares its file
    assert files[:2] == [None, None], files
    assert (files[2] is not None and files[2] == files[3]) if share else files[2:] == [None] * 2


def killed_before_taking() -> tuple[str, bool, str]:
    """Rank 1 is killed after its node's main wrote the file and before it
    took the result: nobody is left to count it taken."""
    import signal

    import torch

    from syncdeco._plane import pernode

    if sd.rank() == 1:

        def killed(*args: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        pernode._take = killed  # type: ignore[assignment]

    @sd.on_main_only(broadcast=True, share=True)
    def build() -> torch.Tensor:
        return torch.ones(2**16)

    path = build().untyped_storage().filename
    assert path is not None
    try:
        sd.barrier("after", timeout=60)
    except sd.SyncError as exc:
        return path, os.path.exists(path), type(exc).__name__
    return path, os.path.exists(path), "passed"


@pytest.mark.skipif(SHM is None, reason="no /dev/shm here")
def test_a_file_left_by_a_killed_job_is_swept_by_the_next(tmp_path: Path) -> None:
    from syncdeco._plane import shm

    main, killed = run_ranks(killed_before_taking, 2, dies=(1,), timeout=90)
    assert killed.value == "killed", killed
    path, there, then = main.unwrap()
    assert there and then == "RankKilledError", main  # left while its writer lives
    # Its writer has ended: the next syncdeco process on the machine to
    # write a file or exit (here, this one) sweeps it, if another did not.
    shm.sweep(shm.DIR)
    assert not os.path.exists(path), path


def async_share(tmp: Path) -> tuple[str | None, str | None]:
    import torch

    @sd.on_main_only(broadcast=True, share=True)
    async def build() -> torch.Tensor:
        return torch.arange(6.0)

    async def main() -> torch.Tensor:
        return await build()

    got = asyncio.run(main())
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    return got.untyped_storage().filename, type(got).__name__


def test_async_functions_share_too(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(async_share, 2, tmp_path)]
    assert outcomes[0] == outcomes[1] and outcomes[0][0] is not None, outcomes


def no_tensors() -> object:
    @sd.on_main_only(broadcast=True, share=True)
    def build() -> dict[str, int]:
        return {"rank": sd.rank()}

    return build()


def test_results_without_tensors_need_nothing_shared(tmp_path: Path) -> None:
    assert [o.unwrap() for o in run_ranks(no_tensors, 2)] == [{"rank": 0}] * 2


# -- one process ---------------------------------------------------------------


def test_share_needs_broadcast() -> None:
    with pytest.raises(TypeError) as info:
        sd.on_main_only(share=True)  # type: ignore[call-overload]
    message = str(info.value)
    assert "on_main_only(share=True) needs broadcast=True" in message
    assert "@on_main_only(broadcast=True, share=True)" in message


def test_share_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"on_main_only\(share=1\): share= must be True or False"):
        sd.on_main_only(broadcast=True, share=1)  # type: ignore[call-overload]


def test_alone_the_result_is_the_function_s_own() -> None:
    import torch

    mine = torch.ones(3)

    @sd.on_main_only(broadcast=True, share=True)
    def build() -> torch.Tensor:
        return mine

    with sd.use_backend(sd.NullBackend()):
        assert build() is mine


def cuda_refused() -> None:
    import torch

    @sd.on_main_only(broadcast=True, share=True)
    def build() -> torch.Tensor:
        return torch.ones(2, device="cuda")

    build()


def test_cuda_tensors_are_refused_with_share() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    outcomes = run_ranks(cuda_refused, 2)
    assert isinstance(outcomes[0].error, ValueError)
    assert "share=True" in str(outcomes[0].error) and "cuda" in str(outcomes[0].error)
    assert isinstance(outcomes[1].error, sd.PeerFailedError)


# -- a full /dev/shm, for real -------------------------------------------------------

SHM_FULL = Path(__file__).parent / "scripts" / "shm_full.py"


def _unshare_refused() -> str | None:
    """Why this machine cannot give a test a /dev/shm of its own, if it cannot."""
    if shutil.which("unshare") is None:
        return "no unshare(1) here"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    if probe.returncode:
        return f"cannot mount a tmpfs on /dev/shm in a mount namespace: {probe.stderr.strip()}"
    return None


def test_a_result_too_large_for_dev_shm_reaches_every_rank(tmp_path: Path) -> None:
    refused = _unshare_refused()
    if refused:
        pytest.skip(refused)
    # Two ranks of a node whose /dev/shm holds 16 MiB (a mount namespace;
    # Docker's default is 64 MB): a 32 MiB share=True result.  (Two nodes,
    # each main falling back for its own: test_a_node_main_that_cannot_write...)
    import torch.distributed as dist

    from syncdeco.testing import launcher_env

    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, 2, is_master=True, wait_for_workers=False
    )
    ranks = " ".join(
        "env "
        + " ".join(f"{k}={v}" for k, v in launcher_env("torchrun", rank, 2, 2).items())
        + f' "$0" {SHM_FULL} 32 > {tmp_path}/rank{rank}.out 2>&1 & pids="$pids $!";'
        for rank in range(2)
    )
    script = (
        f"mount -t tmpfs -o size=16m tmpfs /dev/shm || exit 99; {ranks} "
        f"for p in $pids; do wait $p; echo $?; done; ls -A /dev/shm"
    )
    shell = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a hang is killed with its ranks
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_RESTART_COUNT": "0",
        },
    )
    try:
        out, _ = shell.communicate(timeout=150)
    finally:
        kill_all([shell])
    assert shell.returncode == 0, out
    *statuses, left = out.split("\n", 2)
    assert left.split() == [], out  # nothing left in that /dev/shm
    outputs = [(tmp_path / f"rank{rank}.out").read_text() for rank in range(2)]
    assert statuses == ["0", "0"], (statuses, outputs)
    facts = {}
    for rank, text in enumerate(outputs):
        lines = text.splitlines()
        assert len(lines) == 1 and lines[0].startswith("FACTS "), (rank, text)  # nothing else
        facts[rank] = json.loads(lines[0][len("FACTS ") :])
    for rank, f in facts.items():
        assert f["right"] and f["small_right"], (rank, f)
        assert f["big_file"] is None, (rank, f)  # each rank its own copy
    # the small result still fits, and is shared
    assert facts[0]["small_file"] == facts[1]["small_file"] is not None, facts
    # the main says so once (for two sync points); the other rank does not
    assert facts[1]["said"] == [], facts
    (said,) = facts[0]["said"]
    assert said.startswith("syncdeco: rank 0 at on_main_only"), said
    assert "(32.0 MiB of tensors) does not fit in /dev/shm" in said, said
    assert "--shm-size" in said and "through the store" in said, said


# -- plain values: what fits, names, the sweep, pieces ------------------------------------


def test_a_result_fits_when_it_leaves_a_sixteenth_free() -> None:
    from syncdeco._plane.shm import fits

    mib = 2**20
    assert fits(1 * mib, 64 * mib, 64 * mib)
    assert fits(60 * mib, 64 * mib, 64 * mib)  # 4 MiB, a sixteenth, left
    assert not fits(60 * mib + 1, 64 * mib, 64 * mib)  # pages: 60 MiB and 4 KiB
    assert not fits(64 * mib, 16 * mib, 16 * mib)  # the case
    assert not fits(8 * mib, 10 * mib, 64 * mib)  # little free
    assert fits(0, 4096, 4096 * 16)
    assert not fits(1, 0, 0)


def test_file_names_say_whose_they_are() -> None:
    from syncdeco._plane.shm import name, owner

    assert owner(name(4026531836, 1234, "ab12cd")) == (4026531836, 1234)
    for other in ("torch_1234_5", "syncdeco-1234-ab12cd", "syncdeco-x-1-a", "syncdeco-1-2"):
        assert owner(other) is None, other


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs Linux's /proc")
def test_the_sweep_unlinks_the_files_of_ended_processes_only(tmp_path: Path) -> None:
    from syncdeco._plane import shm

    ns = shm.pid_namespace()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid is free now (reused within this test: practically never)
    files = {
        "ended": shm.name(ns, ended.pid, "aa"),
        "mine": shm.name(ns, os.getpid(), "bb"),
        "elsewhere": shm.name(ns + 1, ended.pid, "cc"),  # another pid namespace's
        "not ours": f"torch_{ended.pid}_1",
        "no such pid": shm.name(ns, 2**80, "dd"),
    }
    for filename in files.values():
        (tmp_path / filename).write_bytes(b"x")
    assert shm.sweep(str(tmp_path)) == [str(tmp_path / files["ended"])]
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in files.items() if k != "ended")


def test_pieces_through_the_store_come_back_whole() -> None:
    import torch
    import torch.distributed as dist

    from syncdeco._plane import pernode, wire

    tensors = [
        torch.arange(pernode._PIECE // 4 + 3, dtype=torch.float32),  # over one piece
        torch.empty(0),
        torch.tensor([True, False]),
        torch.arange(pernode._PIECE // 8, dtype=torch.float64),  # straddles a piece
    ]
    store = dist.HashStore()  # type: ignore[attr-defined]
    pernode._post(store, "k", tensors, 2)
    path, members, count = pickle.loads(store.get("k"))
    assert (path, members, count) == (None, 2, 3)
    got = pernode._fetch(store, "k", count, [wire.meta(t) for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(got, tensors, strict=True))
