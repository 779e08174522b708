"""sd.trace on real Gloo ranks: the merged Chrome trace, its summary and its
timeline.  Ordering comes from syncdeco's sync points and from files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from images import assert_timeline_png

import syncdeco as sd
from syncdeco._trace import merge, summarize
from syncdeco.testing import run_ranks


def _wait_for(path: Path) -> None:
    # Polls a file another rank writes; bounded so that a bug fails, not hangs.
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


def _events(document: dict[str, Any], cat: str, rank: int) -> list[dict[str, Any]]:
    return [e for e in document["traceEvents"] if e.get("cat") == cat and e["pid"] == rank]


def traced_job(tmp: Path) -> None:
    @sd.main_first(name="load")
    def load() -> None:
        if sd.is_main():  # the main waits until every other rank is waiting for it
            for r in range(1, sd.world_size()):
                _wait_for(tmp / f"waiting{r}")

    @sd.barrier_after(every=2, name="step")
    def step(i: int) -> int:
        return i

    @sd.on_main_only(broadcast=True, name="vocab")
    def vocab() -> dict[str, int]:
        return {"hello": 1}

    with sd.trace(tmp / "trace.json"):
        if not sd.is_main():
            (tmp / f"waiting{sd.rank()}").write_text("")
        load()
        for i in range(4):
            step(i)
        assert vocab() == {"hello": 1}


def test_trace_of_three_ranks(tmp_path: Path) -> None:
    for outcome in run_ranks(traced_job, 3, tmp_path):
        outcome.unwrap()
    document = json.loads((tmp_path / "trace.json").read_text())
    assert not (tmp_path / "trace.json.parts").exists()  # merged and cleaned up
    for event in document["traceEvents"]:  # Chrome trace-event fields
        assert {"name", "ph", "pid"} <= event.keys(), event
        if event["ph"] == "X":
            assert event["ts"] >= 0 and event["dur"] >= 0 and "tid" in event, event
    names = {e["args"]["name"] for e in document["traceEvents"] if e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1", "rank 2"}
    for rank in range(3):
        syncs = [e["name"] for e in _events(document, "sync", rank)]
        assert syncs == [
            "main_first:load",
            "barrier_after:step",
            "barrier_after:step",  # every=2: calls 2 and 4
            "on_main_only:vocab",
        ], (rank, syncs)
        assert all(e["args"]["outcome"] == "ok" for e in _events(document, "sync", rank))
    # The others left main_first only after the main rank's body had ended.
    main_body = next(e for e in _events(document, "run", 0) if e["name"] == "load")
    for rank in (1, 2):
        wait = _events(document, "sync", rank)[0]
        assert wait["ts"] + wait["dur"] >= main_body["ts"] + main_body["dur"]
        assert wait["dur"] > 0

    summary = sd_summary(tmp_path / "trace.json")
    assert "syncdeco trace: 3 ranks, 3 sync points" in summary
    assert "main_first:load" in summary and "barrier_after:step" in summary
    assert "last at" in summary.split("stragglers")[1]


def _sync(rank: int, name: str, count: int, ts: float, dur: float) -> dict[str, Any]:
    args = {"count": count, "location": "job.py:1", "scope": "world", "outcome": "ok"}
    event = {"name": name, "cat": "sync", "ph": "X", "ts": ts, "dur": dur, "pid": rank, "tid": 0}
    return {**event, "args": args}


def test_summary_finds_the_slowest_point_and_the_straggler(tmp_path: Path) -> None:
    # Arrival times are what a trace records; here rank 2 is late twice at
    # "barrier:epoch" (by 40 ms and 60 ms) and rank 0 once at "barrier:log" (1 ms).
    events = [
        _sync(0, "barrier:epoch", 1, 0, 40_000),
        _sync(1, "barrier:epoch", 1, 0, 40_000),
        _sync(2, "barrier:epoch", 1, 40_000, 10),
        _sync(0, "barrier:epoch", 2, 100_000, 60_000),
        _sync(1, "barrier:epoch", 2, 100_000, 60_000),
        _sync(2, "barrier:epoch", 2, 160_000, 10),
        _sync(0, "barrier:log", 1, 201_000, 10),
        _sync(1, "barrier:log", 1, 200_000, 1_000),
        _sync(2, "barrier:log", 1, 200_000, 1_000),
    ]
    trace = tmp_path / "t.json"
    other = {"producer": "syncdeco", "world_size": 3}
    trace.write_text(json.dumps({"traceEvents": events, "otherData": other}))
    summary = summarize(trace)
    assert [p.name for p in summary.points] == ["barrier:epoch", "barrier:log"]
    epoch = summary.points[0]
    assert (epoch.calls, epoch.max_wait_ms) == (2, 60.0)
    assert epoch.total_wait_ms == pytest.approx(200.02)
    assert epoch.median_spread_ms == 50.0
    assert [(s.rank, s.last_arrivals, s.late_ms) for s in summary.stragglers] == [
        (2, 2, 100.0),
        (0, 1, 1.0),
    ]


def sd_summary(trace: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "syncdeco", "summary", str(trace)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_timeline_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for outcome in run_ranks(traced_job, 2, tmp_path):
        outcome.unwrap()
    png = tmp_path / "timeline.png"
    subprocess.run(
        [sys.executable, "-m", "syncdeco", "plot", str(tmp_path / "trace.json"), "-o", str(png)],
        check=True,
        capture_output=True,
    )
    assert_timeline_png(png, ranks=2)


def traced_failure(tmp: Path) -> None:
    @sd.on_main_only(broadcast=True, name="vocab")
    def vocab() -> dict[str, int]:
        raise FileNotFoundError("vocab.txt")

    with sd.trace(tmp / "trace.json"):
        vocab()


def test_a_block_that_raises_is_merged_all_the_same(tmp_path: Path) -> None:
    outcomes = run_ranks(traced_failure, 2, tmp_path)
    assert isinstance(outcomes[0].error, FileNotFoundError)
    assert isinstance(outcomes[1].error, sd.PeerFailedError)
    assert not (tmp_path / "trace.json.parts").exists()
    summary = sd_summary(tmp_path / "trace.json")
    failed = summary.split("sync points that failed:")[1].splitlines()[1:]
    assert failed[0].strip().startswith("rank 0 raised FileNotFoundError: vocab.txt"), failed
    assert "rank 1 at on_main_only:vocab (call 1): PeerFailedError: rank 0 raised" in summary


def one_rank_raises_late(tmp: Path) -> None:
    # Rank 1 raises outside any sync point; rank 0 finishes its block and
    # must hear of it at the block's end, not wait out the timeout there.
    sd.init(timeout=60)
    with sd.trace(tmp / "trace.json"):
        sd.barrier("inside")
        if sd.rank() == 1:
            raise KeyError("bad batch")


def test_a_rank_that_raises_is_reported_at_the_end_of_the_block(tmp_path: Path) -> None:
    outcomes = run_ranks(one_rank_raises_late, 2, tmp_path, timeout=50)
    assert isinstance(outcomes[1].error, KeyError)
    err = outcomes[0].error
    assert isinstance(err, sd.PeerFailedError), outcomes[0].tb
    assert err.rank == 1 and err.exc_type == "KeyError"
    assert "syncdeco.trace(trace.json)" in str(err) and "test_trace.py:" in str(err)
    names = {e["name"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]}
    assert "barrier:inside" in names


def main_raises_while_a_member_waits(tmp: Path) -> None:
    # Rank 0 raises outside any sync point, so its block ends (a sync point)
    # while rank 1 waits at another one: they are out of step.
    sd.init(timeout=60)
    with sd.trace(tmp / "trace.json"):
        sd.barrier("a")
        if sd.rank() == 0:
            raise ValueError("bad config")
        try:
            sd.barrier("b")
        except sd.PeerFailedError:
            # Rank 0 merges what it has as soon as it hears; this rank's part
            # comes after that (else the merge would have both, and tidy up).
            _wait_for(tmp / "trace.json")
            raise


def test_a_main_that_raises_while_a_member_waits_elsewhere(tmp_path: Path) -> None:
    outcomes = run_ranks(main_raises_while_a_member_waits, 2, tmp_path, timeout=50)
    assert isinstance(outcomes[0].error, ValueError), outcomes[0].tb
    err = outcomes[1].error
    assert isinstance(err, sd.PeerFailedError), outcomes[1].tb
    assert err.out_of_step and err.point.startswith("barrier 'b'")
    assert "rank 0 was at barrier 'syncdeco.trace(trace.json)'" in str(err), str(err)
    # Rank 0 merged what it had before rank 1's part came; nothing is lost,
    # and a merge now has both.
    parts = sorted(p.name for p in (tmp_path / "trace.json.parts").iterdir())
    assert parts == ["rank0.json", "rank1.json"]
    sd_merge = [sys.executable, "-m", "syncdeco", "merge", str(tmp_path / "trace.json")]
    subprocess.run(sd_merge, capture_output=True, check=True)
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["name"] == "barrier:a"} == {0, 1}
    assert not (tmp_path / "trace.json.parts").exists()


def a_timeout_inside(tmp: Path) -> None:
    sd.init(timeout=2)
    with sd.trace(tmp / "trace.json"):
        if sd.rank() == 0:
            try:
                sd.barrier("alone", timeout=0.5)  # rank 1 is not coming yet
            finally:
                (tmp / "gave-up").write_text("")
        else:
            _wait_for(tmp / "gave-up")


def test_a_block_that_timed_out_leaves_parts_to_merge(tmp_path: Path) -> None:
    outcomes = run_ranks(a_timeout_inside, 2, tmp_path)
    assert isinstance(outcomes[0].error, sd.SyncTimeoutError)
    # Rank 0 left without meeting; rank 1, which left its block normally,
    # reached the block's end after rank 0 had given up on it and is told so.
    err = outcomes[1].error
    assert isinstance(err, sd.SyncTimeoutError), outcomes[1].tb
    assert "syncdeco.trace(trace.json)" in str(err) and "too late" in str(err)
    parts = tmp_path / "trace.json.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["rank0.json", "rank1.json"]
    merged = subprocess.run(
        [sys.executable, "-m", "syncdeco", "merge", str(tmp_path / "trace.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "merged into" in merged.stdout
    names = {e["name"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]}
    assert "barrier:alone" in names


def report_times_out(tmp: Path) -> None:
    # Rank 0's step raises; its report of that times out (rank 1 is late),
    # so rank 0 leaves the block with its ValueError: it must not then wait
    # at the block's end for a rank that is out of step.
    sd.init(timeout=60)

    @sd.barrier_after(timeout=1, name="step")
    def step() -> None:
        if sd.rank() == 0:
            raise ValueError("bad step")

    try:
        with sd.trace(tmp / "trace.json"):
            if sd.rank() == 1:
                _wait_for(tmp / "rank0-left")
            step()
    finally:
        if sd.rank() == 0:
            (tmp / "rank0-left").write_text("")


def test_a_rank_whose_report_timed_out_does_not_wait_at_the_end(tmp_path: Path) -> None:
    outcomes = run_ranks(report_times_out, 2, tmp_path, timeout=40)  # not the 60 s timeout
    assert isinstance(outcomes[0].error, ValueError), outcomes[0].tb
    assert isinstance(outcomes[1].error, sd.SyncTimeoutError), outcomes[1].tb
    parts = sorted(p.name for p in (tmp_path / "trace.json.parts").iterdir())
    assert parts == ["rank0.json", "rank1.json"]  # left for `python -m syncdeco merge`


def test_merge_skips_parts_it_cannot_read_and_takes_the_newest_run(tmp_path: Path) -> None:
    parts = tmp_path / "t.json.parts"
    parts.mkdir()
    (parts / "rank7.json").write_text("{}")  # not a part
    (parts / "rank3.json").write_text(json.dumps({"rank": 3, "world_size": 4, "events": []}))
    os.utime(parts / "rank3.json", (0, 0))  # left by an older, larger run
    for rank in (0, 1):
        part = {"rank": rank, "world_size": 2, "events": [_sync(rank, "barrier:x", 1, 5, 1)]}
        (parts / f"rank{rank}.json").write_text(json.dumps(part))
    assert merge(tmp_path / "t.json") == []
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["otherData"]["world_size"] == 2
    assert {e["pid"] for e in document["traceEvents"]} == {0, 1}
    assert sorted(p.name for p in parts.iterdir()) == ["rank3.json", "rank7.json"]


def two_blocks(tmp: Path) -> int:
    for _ in range(5):  # one path, back to back, no sync point inside
        with sd.trace(tmp / "trace.json"):
            pass
    return len(json.loads((tmp / "trace.json").read_text())["traceEvents"])


def test_blocks_back_to_back_on_one_path(tmp_path: Path) -> None:
    counts = [o.unwrap() for o in run_ranks(two_blocks, 3, tmp_path)]
    assert counts == [6, 6, 6]  # names and order of 3 ranks, no events: every part merged


def test_summary_keeps_the_nodes_of_a_local_sync_point_apart(tmp_path: Path) -> None:
    # One local=True call on two nodes is two meetings (ranks 0, 2 on one
    # node and 1, 3 on the other, as SLURM's cyclic placement numbers them):
    # one call, and each node's straggler judged against its own node only.
    def local(rank: int, node: str, ts: float) -> dict[str, Any]:
        event = _sync(rank, "main_first:load", 1, ts, 10)
        event["args"]["scope"] = f"node SLURM_NODEID={node}"
        return event

    events = [local(0, "0", 0), local(2, "0", 5_000), local(1, "1", 100_000), local(3, "1", 0)]
    trace = tmp_path / "t.json"
    other = {"producer": "syncdeco", "world_size": 4}
    trace.write_text(json.dumps({"traceEvents": events, "otherData": other}))
    summary = summarize(trace)
    assert [(p.name, p.calls) for p in summary.points] == [("main_first:load", 1)]
    assert [(s.rank, s.late_ms) for s in summary.stragglers] == [(1, 100.0), (2, 5.0)]


def test_trace_on_one_process(tmp_path: Path) -> None:
    @sd.barrier_after
    def step() -> None: ...

    with sd.trace(tmp_path / "t.json"):
        step()
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["otherData"]["world_size"] == 1  # the Null backend records nothing
    with pytest.raises(sd.SyncError, match="already recording"), sd.trace(tmp_path / "a"):
        with sd.trace(tmp_path / "b"):
            pass


def test_summary_of_a_file_that_is_not_a_trace(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[1, 2]")
    out = subprocess.run(
        [sys.executable, "-m", "syncdeco", "summary", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "not a Chrome trace-event JSON object" in out.stderr
    os.remove(tmp_path / "x.json")
