"""syncdeco inside the frameworks that set up the process group themselves:
Hugging Face Accelerate (``PartialState``) under torchrun, and Lightning
Fabric, both with its own launcher (a plain ``python script.py``: Fabric starts
rank 1 by running the script again) and under torchrun.  Real Gloo ranks; the
scripts are in tests/scripts/ and print ``[rank R/W] ...`` lines.

Under torchrun the ranks are forked from the zygote (``zygote.py``, torch
imported once) with the variables torchrun gives them and a store hosted as
torchrun's agent hosts it (``run_forked_ranks``): the frameworks read those
variables and make their group from them as under torchrun itself; the start
of a real torchrun job is tested in test_startup.py and test_torchrun.py.
Fabric's own launcher runs as a user runs it: ``python script.py``, a fresh
interpreter, which starts rank 1 as another."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from scripted import run_forked_ranks, run_script

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _torchrun(script: list[str], tmp_path: Path) -> str:
    """``torchrun --standalone --nproc-per-node 2 SCRIPT...``, the ranks forked."""
    return run_forked_ranks(script, 2, tmp_path)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The directory the scripts order their events with."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def _assert_ok(text: str, out: Path) -> None:
    # main_first: rank 1 was already at the door when rank 0 wrote the cache,
    # and still found it there on entry.
    assert "[rank 0/2] main_first: cache there on entry=False" in text, text
    assert "[rank 1/2] main_first: cache there on entry=True" in text, text
    assert (out / "cache").read_text() == "written by rank 0"
    # on_main_only(broadcast=True): the body ran on rank 0 only, and both
    # ranks got its dict (rank 0's pid in it).
    results = dict(
        re.findall(r"^\[rank (\d)/2\] on_main_only\(broadcast=True\) returned (.*)$", text, re.M)
    )
    assert sorted(results) == ["0", "1"], text
    vocab = [ast.literal_eval(results[r]) for r in ("0", "1")]
    assert vocab[0] == vocab[1]
    assert vocab[0]["built_by"] == 0 and vocab[0]["tokens"] == ["<pad>", "<unk>", "hi"]
    assert (out / "vocab-runs").read_text() == "rank 0\n"
    for rank in (0, 1):
        # the barrier: rank 1 reads the file only after rank 0 wrote it
        assert f"[rank {rank}/2] after the barrier: vocab body ran ['rank 0']" in text, text
        assert f"[rank {rank}/2] done" in text, text


def _assert_fail(text: str, out: Path) -> None:
    assert "[rank 0/2] my own ConnectionError: HTTP 503 from the dataset mirror" in text, text
    found = re.search(
        r"^\[rank 1/2\] PeerFailedError after ([\d.]+)s: rank 0 raised ConnectionError: "
        r"HTTP 503 from the dataset mirror \(seen by rank 1 at main_first '[\w.<>]+\.download' "
        r"\(call 1, framework_checks\.py:\d+, called from framework_checks\.py:\d+\)\)",
        text,
        re.M,
    )
    assert found, text
    # heard of rank 0's failure, not main_first's 60 s timeout (which would
    # raise SyncTimeoutError, after 60 s)
    assert float(found[1]) < 60
    assert (
        "[rank 1/2] attributes rank=0 exc_type=ConnectionError "
        "message='HTTP 503 from the dataset mirror'"
    ) in text, text
    assert (
        "[rank 1/2] remote traceback ends with 'ConnectionError: HTTP 503 from the dataset mirror'"
    ) in text, text
    assert not (out / "rank1-ran-download").exists()  # rank 1 skipped the body
    for rank in (0, 1):
        assert f"[rank {rank}/2] the group still works" in text, text
        assert f"[rank {rank}/2] done" in text, text


def _assert_modes(text: str, out: Path, modes: str) -> None:
    """Each of ``modes`` ran and said so, in order, on both ranks."""
    for rank in (0, 1):
        said = re.findall(rf"^\[rank {rank}/2\] (\w+) checks done$", text, re.M)
        assert said == modes.split(","), text
    for mode in modes.split(","):
        (_assert_ok if mode == "ok" else _assert_fail)(text, out)


# Each launch runs both sets of checks (one launch starts three processes
# that import torch and the framework); the order differs between launches,
# so that each set also runs as the first syncdeco use of a framework's group.
def test_accelerate_partial_state(out: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    modes = "fail,ok"
    text = _torchrun([str(SCRIPTS / "accelerate_ranks.py"), str(out), modes], tmp_path)
    for rank in (0, 1):
        assert (
            f"[rank {rank}/2] accelerate process_index={rank} num_processes=2 "
            f"local_process_index={rank} distributed_type=MULTI_CPU group backend=gloo"
        ) in text, text
        assert f"[rank {rank}/2] syncdeco agrees with PartialState" in text, text
    _assert_modes(text, out, modes)


@pytest.mark.parametrize(
    ("launcher", "modes"),
    [("fabric", "ok,fail"), ("torchrun", "fail,ok")],
    ids=["fabric-launches", "torchrun"],
)
def test_lightning_fabric(launcher: str, modes: str, out: Path, tmp_path: Path) -> None:
    pytest.importorskip("lightning_fabric")
    script = [str(SCRIPTS / "fabric_ranks.py"), str(out), modes]
    if launcher == "fabric":
        text = run_script([sys.executable, *script], tmp_path)
    else:
        text = _torchrun(script, tmp_path)
    environment = "LightningEnvironment" if launcher == "fabric" else "TorchElasticEnvironment"
    for rank in (0, 1):
        assert (
            f"[rank {rank}/2] fabric global_rank={rank} world_size=2 local_rank={rank} "
            f"group backend=gloo environment={environment}"
        ) in text, text
        assert f"[rank {rank}/2] syncdeco agrees with Fabric" in text, text
    # Before fabric.launch(), syncdeco has only the environment to go by.
    if launcher == "fabric":
        # Fabric's own launcher: the script is run twice, by hand with nothing
        # set (one process as far as anyone can tell) and by Fabric for rank 1
        # with WORLD_SIZE and LOCAL_RANK but no RANK: syncdeco refuses to
        # guess there rather than answer 0/1 on both.
        assert (
            "[before fabric.launch(), RANK=None WORLD_SIZE=None LOCAL_RANK=None] syncdeco says 0/1"
        ) in text, text
        assert (
            "[before fabric.launch(), RANK=None WORLD_SIZE=2 LOCAL_RANK=1] "
            "syncdeco says LaunchEnvError: "
        ) in text, text
        assert text.count("before fabric.launch()") == 2
    else:
        for rank in (0, 1):
            assert (
                f"[before fabric.launch(), RANK={rank} WORLD_SIZE=2 LOCAL_RANK={rank}] "
                f"syncdeco says {rank}/2"
            ) in text, text
    _assert_modes(text, out, modes)
