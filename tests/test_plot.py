"""The timeline PNG (``python -m syncdeco plot``), checked by decoding it.

The trace is written by hand in the shape ``sd.trace`` merges (a real one
is plotted in test_trace.py): a long ``main_first`` wait, and two sync
points whose waits are a few tenths of a millisecond in a 250 ms run, which
must still show, each in its own colour, named in the legend.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from syncdeco._trace import _PALETTE

RANKS = 4


def _sync(name: str, rank: int, ts_ms: float, dur_ms: float, outcome: str = "ok") -> dict[str, Any]:
    return {
        "name": name,
        "cat": "sync",
        "ph": "X",
        "ts": ts_ms * 1e3,
        "dur": dur_ms * 1e3,
        "pid": rank,
        "tid": 0,
        "args": {"count": 1, "location": "train.py:10", "scope": "world", "outcome": outcome},
    }


def _run(name: str, rank: int, ts_ms: float, dur_ms: float) -> dict[str, Any]:
    return {
        "name": name,
        "cat": "run",
        "ph": "X",
        "ts": ts_ms * 1e3,
        "dur": dur_ms * 1e3,
        "pid": rank,
        "tid": 0,
    }


def _trace(path: Path, failed: bool = False) -> Path:
    events = []
    for r in range(RANKS):
        events.append(_sync("main_first:__main__.load_checkpoint", r, 0, 50 - 10 * r))
        events.append(_run("__main__.load_checkpoint", r, 50, 15))
        for start in (70, 120, 170):
            events.append(_run("__main__.train_step", r, start, 40))
            events.append(_sync("barrier_after:__main__.train_step", r, start + 40, 0.3))
        outcome = "PeerFailedError: rank 0 raised OSError" if failed and r else "ok"
        events.append(_sync("barrier_after:__main__.save_checkpoint", r, 240, 0.2, outcome))
    document = {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"producer": "syncdeco", "world_size": RANKS, "epoch_us": 0.0},
    }
    path.write_text(json.dumps(document))
    return path


def _plot(trace: Path, png: Path) -> Any:
    """Draw with the command a user runs, and decode the PNG it wrote."""
    image = pytest.importorskip("matplotlib.image")
    cmd = [sys.executable, "-m", "syncdeco", "plot", str(trace), "-o", str(png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return image.imread(str(png))  # float RGBA rows x columns x channels


def _pixels_of(pixels: Any, colour: str) -> int:
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    near = abs(pixels[:, :, :3] - rgb).max(axis=2) < 0.02
    return int(near.sum())


def test_every_sync_point_shows_in_its_own_colour(tmp_path: Path) -> None:
    pixels = _plot(_trace(tmp_path / "trace.json"), tmp_path / "timeline.png")
    height, width, channels = pixels.shape
    assert channels in (3, 4)
    assert 1000 <= width <= 1500 and 300 <= height <= 600, pixels.shape
    # not blank: most of it is white background, but a good part is drawn
    white = (pixels[:, :, :3] > 0.98).all(axis=2)
    assert 0.2 < 1 - white.mean() < 0.8
    # the sync points, slowest first, get the first colours; each shows
    # in the bars and the legend, the short waits at least a few pixels
    # wide on every rank (a legend patch alone is about 200 pixels)
    load, step, save = (_pixels_of(pixels, c) for c in _PALETTE[:3])
    assert load > 20_000, load
    assert step > 1000 and save > 400, (step, save)
    assert _pixels_of(pixels, _PALETTE[3]) == 0  # no fourth sync point


def test_a_failed_sync_point_is_outlined_in_red(tmp_path: Path) -> None:
    ok = _plot(_trace(tmp_path / "ok.json"), tmp_path / "ok.png")
    failed = _plot(_trace(tmp_path / "failed.json", failed=True), tmp_path / "failed.png")
    red = "#C44E52"
    assert _pixels_of(ok, red) == 0
    assert _pixels_of(failed, red) > 3 * 50  # three ranks' outlines and the legend's
