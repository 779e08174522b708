"""The examples run as their docstrings say, on the Null backend and on Gloo
ranks under torchrun, and do what they claim.

The quickstart runs under torchrun itself, as the README says (4 ranks);
each rank is a fresh interpreter.  The other examples' ranks are forked from
a zygote that has imported torch and syncdeco (``zygote.py``), with the
variables torchrun gives them and a store hosted as torchrun's agent hosts
it (``run_forked_ranks``): what they show is the example's behaviour, not
the start of a torchrun job (tested with torchrun in test_startup.py and
test_torchrun.py), and each rank is two seconds of CPU cheaper.  On the Null
backend (``python examples/NAME.py``) the quickstart starts a fresh
interpreter; the other examples' runs are forked from the zygote too, which
runs the script as ``__main__`` with the same arguments, environment and way
of ending."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import docs_output
import pytest
from images import assert_timeline_png
from scripted import run_forked, run_forked_ranks, run_script

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    return run_script(args, tmp_path, extra_env)


def _torchrun(
    ranks: int, script: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> str:
    return _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(ranks), str(EXAMPLES / script), *args,
        ],
        tmp_path,
        env,
    )  # fmt: skip


def _ranks(
    ranks: int, script: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> str:
    """``torchrun --standalone --nproc-per-node RANKS examples/SCRIPT ARGS...``,
    each rank forked from the zygote (``run_forked_ranks``)."""
    return run_forked_ranks([str(EXAMPLES / script), *args], ranks, tmp_path, env)


def _python(script: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``python examples/SCRIPT ARGS...``, forked from the zygote."""
    return run_forked([str(EXAMPLES / script), *args], tmp_path, env)


def _said(out: str, rank: int, world: int, pattern: str) -> list[re.Match[str]]:
    """The lines rank `rank` of `world` printed that match `pattern` in full."""
    prefix = re.escape(f"[rank {rank}/{world}] ")
    return [m for line in out.splitlines() if (m := re.fullmatch(prefix + pattern, line))]


def _said_once(out: str, rank: int, world: int, pattern: str) -> re.Match[str]:
    found = _said(out, rank, world, pattern)
    assert len(found) == 1, f"rank {rank}/{world} should print {pattern!r} once:\n{out}"
    return found[0]


def test_quickstart_on_the_null_backend(tmp_path: Path) -> None:
    out = _run([sys.executable, str(EXAMPLES / "quickstart.py")], tmp_path)
    assert "[rank 0/1] my own ValueError: validation set is empty" in out
    assert "[rank 0/1] done" in out


def test_quickstart_on_four_gloo_ranks(tmp_path: Path) -> None:
    out = _torchrun(4, "quickstart.py", tmp_path)
    assert out.count("built the dataset cache") == 1
    for rank in (1, 2, 3):
        assert f"[rank {rank}/4] PeerFailedError: rank 0 raised ValueError" in out
        assert f"[rank {rank}/4] done" in out
    assert "[rank 0/4] my own ValueError" in out


def test_when_things_go_wrong_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = _ranks(2, "when_things_go_wrong.py", tmp_path)
    # docs/errors.md shows what it prints, line for line
    docs_output.check("examples/when_things_go_wrong.py", out)
    assert "[rank 1] PeerFailedError: rank 0 raised ConnectionError: HTTP 503" in out
    assert "[rank 0] SyncTimeoutError: rank 0 waited 1s at barrier 'end of epoch'" in out
    assert "rank(s) 1 did not arrive: rank 1 (last seen at main_first" in out
    assert ") is in read_shard (" in out  # where it is stuck, from its own stack
    assert out.count("SyncMismatchError: ranks reached different sync points") == 2
    # a mismatch names where each decorated function was called, too
    assert out.count("barrier_after '__main__.load_checkpoint' (call 1, when_things_go_") == 2
    assert re.search(r"'__main__\.save_checkpoint' \(call 1, \S+:\d+, called from \S+:\d+\)", out)
    assert "no message" not in out
    assert "[rank 0] the group still works" in out
    assert "[rank 0] RankExitedError: rank 1 exited without reaching this sync point" in out


# -- datasets_main_first.py ---------------------------------------------------

# No hub can be reached: the example loads a CSV it writes itself.
HF_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _hf_env(tmp_path: Path) -> dict[str, str]:
    return {**HF_OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}


CACHE_FILE = r"(cache-[0-9a-f]+\.arrow)"


def test_datasets_main_first_tokenizes_once_on_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="datasets is in the examples extra")
    data, env = tmp_path / "data", _hf_env(tmp_path)
    out = _ranks(3, "datasets_main_first.py", tmp_path, "--dir", str(data), env=env)
    # Rank 0 ran tokenize and wrote the map() cache; ranks 1 and 2 loaded that
    # very file (it existed before their map() ran) and tokenized nothing:
    # their rows say rank 0 made them.
    written = _said_once(out, 0, 3, rf"map: tokenized 240 rows, wrote {CACHE_FILE}")[1]
    loaded = rf"map: loaded {re.escape(written)} from the cache, tokenized nothing"
    for rank in (1, 2):
        _said_once(out, rank, 3, loaded)
        assert not _said(out, rank, 3, "map: tokenized.*")
    for rank in (0, 1, 2):
        _said_once(out, rank, 3, r"240 rows, \d+ tokens, tokenized by rank\(s\) \[0\]")
        _said_once(out, rank, 3, "done")
    # One fingerprint on every rank: exactly one map() result on disk.
    caches = list((data / "hf-cache").rglob("cache-*.arrow"))
    assert [p.name for p in caches] == [written]
    mtime = caches[0].stat().st_mtime_ns

    # A new job (one process, the Null backend: the ranks of the job above
    # have shown a member's load): the fingerprint is the same across
    # processes too, so its main loads the file and tokenizes nothing.
    out = _python("datasets_main_first.py", tmp_path, "--dir", str(data), env=env)
    _said_once(out, 0, 1, loaded)
    _said_once(out, 0, 1, r"240 rows, \d+ tokens, tokenized by rank\(s\) \[0\]")
    assert not _said(out, 0, 1, "map: tokenized.*")
    assert [p.name for p in (data / "hf-cache").rglob("cache-*.arrow")] == [written]
    assert caches[0].stat().st_mtime_ns == mtime  # not rewritten


def test_datasets_main_first_on_the_null_backend(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="datasets is in the examples extra")
    args = ("--dir", str(tmp_path / "data"))
    out = _python("datasets_main_first.py", tmp_path, *args, env=_hf_env(tmp_path))
    written = _said_once(out, 0, 1, rf"map: tokenized 240 rows, wrote {CACHE_FILE}")[1]
    out = _python("datasets_main_first.py", tmp_path, *args, env=_hf_env(tmp_path))
    _said_once(out, 0, 1, rf"map: loaded {re.escape(written)} from the cache, tokenized nothing")
    _said_once(out, 0, 1, "done")


# -- ddp_checkpoint.py --------------------------------------------------------

PARAMS = r"params ([0-9a-f]{16})"


def _saved_steps(out: str, world: int) -> list[int]:
    return [int(m[1]) for m in _said(out, 0, world, r"saved checkpoint at step (\d+)")]


def test_ddp_checkpoint_resumes_on_two_gloo_ranks(tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "ckpt"
    # The first run also writes the trace that _check_trace reads (one job
    # less); the second runs without one.
    trace = tmp_path / "trace.json"
    args = ("--dir", str(ckpt), "--steps", "20", "--trace", str(trace))
    out = _ranks(2, "ddp_checkpoint.py", tmp_path, *args)
    assert _saved_steps(out, 2) == [10, 20]
    assert not _said(out, 1, 2, "saved checkpoint.*")  # only the main rank saves
    for rank in (0, 1):
        _said_once(out, rank, 2, r"no checkpoint in .*: starting at step 0")
    first = {
        rank: _said_once(out, rank, 2, rf"finished at step 20, {PARAMS}")[1] for rank in (0, 1)
    }
    assert first[0] == first[1]  # DDP kept the ranks' models identical
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] == 20

    # A new job resumes from the checkpoint.
    out = _ranks(2, "ddp_checkpoint.py", tmp_path, "--dir", str(ckpt), "--steps", "40")
    for rank in (0, 1):
        # Both ranks loaded the checkpoint: their parameters are those run 1 ended with.
        _said_once(out, rank, 2, f"resumed from step 20, params {first[0]}")
        assert not _said(out, rank, 2, "no checkpoint.*")
    assert _saved_steps(out, 2) == [30, 40]  # went on from step 21, not from 1
    last = {rank: _said_once(out, rank, 2, rf"finished at step 40, {PARAMS}")[1] for rank in (0, 1)}
    assert last[0] == last[1] != first[0]
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40
    assert set(state) == {"step", "model", "optimizer"}
    assert not list(ckpt.glob(".*.tmp"))  # atomic_save left no temporary file behind
    _check_trace(trace, tmp_path)


def test_ddp_checkpoint_resume_is_exact_on_the_null_backend(tmp_path: Path) -> None:
    """20 steps, a checkpoint and 20 more give bit for bit the model of 40 in one go."""
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    out = _python("ddp_checkpoint.py", tmp_path, "--dir", str(resumed), "--steps", "20")
    middle = _said_once(out, 0, 1, rf"finished at step 20, {PARAMS}")[1]
    out = _python("ddp_checkpoint.py", tmp_path, "--dir", str(resumed), "--steps", "40")
    _said_once(out, 0, 1, f"resumed from step 20, params {middle}")
    assert _saved_steps(out, 1) == [30, 40]
    after_resume = _said_once(out, 0, 1, rf"finished at step 40, {PARAMS}")[1]
    out = _python("ddp_checkpoint.py", tmp_path, "--dir", str(straight), "--steps", "40")
    assert _saved_steps(out, 1) == [10, 20, 30, 40]
    assert _said_once(out, 0, 1, rf"finished at step 40, {PARAMS}")[1] == after_resume


def _check_trace(trace: Path, tmp_path: Path) -> None:
    """The ``--trace`` of a 20-step run on two ranks is a Chrome trace with
    every sync point, and ``python -m syncdeco summary`` and ``plot`` read it."""
    # Loaded back: a Chrome trace-event object, each event with the fields its phase needs.
    document = json.loads(trace.read_text())
    assert isinstance(document["traceEvents"], list) and document["displayTimeUnit"] == "ms"
    for event in document["traceEvents"]:
        assert isinstance(event["name"], str) and event["ph"] in ("X", "M"), event
        assert isinstance(event["pid"], int), event
        if event["ph"] == "X":
            assert event["ts"] >= 0 and event["dur"] >= 0 and isinstance(event["tid"], int)
    for rank in (0, 1):
        syncs = [
            e["name"].split(".")[-1]
            for e in document["traceEvents"]
            if e.get("cat") == "sync" and e["pid"] == rank
        ]
        # load once, a meeting every 5th of 20 steps, two saves
        assert syncs.count("load_checkpoint") == 1, syncs
        assert syncs.count("train_step") == 4, syncs
        assert syncs.count("save_checkpoint") == 2, syncs
    summary = _run([sys.executable, "-m", "syncdeco", "summary", str(trace)], tmp_path)
    assert "syncdeco trace: 2 ranks, 3 sync points" in summary
    assert "barrier_after:__main__.train_step" in summary
    docs_output.check("summary of examples/ddp_checkpoint.py", summary)  # docs/observability.md
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    _run([sys.executable, "-m", "syncdeco", "plot", str(trace), "-o", str(png)], tmp_path)
    assert_timeline_png(png, ranks=2)


# -- vocab_broadcast.py -------------------------------------------------------

EMBEDDING = r"embedding Tensor \((?P<rows>\d+), 16\) torch\.float32, checksum (?P<sum>[0-9a-f]{16})"


def test_vocab_broadcast_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = _ranks(2, "vocab_broadcast.py", tmp_path, "--dir", str(tmp_path / "vocab"))
    built = _said_once(out, 0, 2, r"built a vocabulary of (\d+) words from \d+ in corpus\.txt")
    assert "built a vocabulary" not in out.replace(built[0], "")  # rank 0 alone built it
    held = [_said_once(out, rank, 2, rf"vocab of (\d+) words, {EMBEDDING}") for rank in (0, 1)]
    # Same words, and the same randomly drawn embedding matrix, on both ranks.
    assert {m.groups() for m in held} == {(built[1], built[1], held[0]["sum"])}
    encoded = {_said_once(out, rank, 2, r"encoded: (\[[\d, ]+\])")[1] for rank in (0, 1)}
    assert len(encoded) == 1
    for rank in (0, 1):
        _said_once(out, rank, 2, f"checksum agrees with rank 0: {held[0]['sum']}")


def test_vocab_broadcast_on_the_null_backend(tmp_path: Path) -> None:
    out = _python("vocab_broadcast.py", tmp_path, "--dir", str(tmp_path / "vocab"))
    built = _said_once(out, 0, 1, r"built a vocabulary of (\d+) words from \d+ in corpus\.txt")
    checksum = _said_once(out, 0, 1, rf"vocab of {built[1]} words, {EMBEDDING}")["sum"]
    _said_once(out, 0, 1, f"checksum agrees with rank 0: {checksum}")
