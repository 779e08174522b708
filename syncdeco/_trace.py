"""Where time goes at sync points: an opt-in recorder, a Chrome trace, and
what to read from it.

Under :func:`trace`, each rank records every sync point it reaches (when it
arrived, when it left, how long it waited, how it ended) and the time spent
in the bodies of decorated functions.  On leaving the block each rank writes
its part next to the output file; after a sync point the main rank merges
the parts into one Chrome trace-event file (one process per rank) that
Perfetto or chrome://tracing opens.  :func:`summarize` ranks the slowest sync
points and the stragglers; :func:`plot` draws a timeline PNG (matplotlib).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, final

from ._backend import Backend, SyncPoint
from ._errors import SyncError

__all__ = ["Recorder", "active", "merge", "plot", "summarize", "trace"]

_log = logging.getLogger("syncdeco")

_PARTS_SUFFIX: Final = ".parts"
_MERGE_POINT: Final = "syncdeco.trace"


@final
class Recorder:
    """The events of one rank.  Times are wall-clock nanoseconds, so ranks
    on one host (or on hosts with synchronised clocks) line up."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def sync(
        self,
        backend: Backend,
        point: SyncPoint,
        local: bool,
        failing: bool,
        arrived: int,
        error: BaseException | None,
    ) -> None:
        left = time.time_ns()
        rank = backend.rank()
        outcome = "ok" if error is None else f"{type(error).__name__}: {error}".split("\n")[0]
        self.events.append(
            {
                "name": f"{point.kind}:{point.name}",
                "cat": "sync",
                "ph": "X",
                "ts": arrived / 1000,
                "dur": (left - arrived) / 1000,
                "pid": rank,
                "tid": 0,
                "args": {
                    "count": point.count,
                    "location": point.location,
                    # the ranks that meet at this sync point: all, or one node's
                    "scope": f"node of rank {rank - backend.local_rank()}" if local else "world",
                    "reported_failure": failing,
                    "outcome": outcome,
                },
            }
        )

    def body(self, backend: Backend, name: str, started: int) -> None:
        ended = time.time_ns()
        self.events.append(
            {
                "name": name,
                "cat": "run",
                "ph": "X",
                "ts": started / 1000,
                "dur": (ended - started) / 1000,
                "pid": backend.rank(),
                "tid": 0,
            }
        )


active: Recorder | None = None
"""The recorder of the :func:`trace` block this process is in, if any."""


@contextlib.contextmanager
def trace(path: str | os.PathLike[str]) -> Iterator[None]:
    """Record every sync point of this block, on every rank, into one Chrome
    trace-event file at ``path`` (open it in https://ui.perfetto.dev or
    chrome://tracing; summarise it with ``python -m syncdeco summary PATH``).

    Every rank must enter the block, and give the same ``path`` on a
    filesystem the main rank can read: each rank writes its part to
    ``PATH.parts/`` and, when the block ends normally, all ranks meet at a
    sync point and the main rank merges the parts into ``PATH``.  If the
    block raises, the ranks do not meet (one of them may be gone): each
    leaves its part, and ``python -m syncdeco merge PATH`` merges them.

    Recording costs a clock read and a list append per sync point and per
    decorated call; outside the block syncdeco records nothing.  The Null
    backend takes a fast path that records nothing: it has no one to wait for.
    """
    from ._backend import get_backend
    from ._decorate import barrier

    global active
    if active is not None:
        raise SyncError(
            "sd.trace() is already recording in this process; end that block "
            "before starting another one"
        )
    target = Path(path)
    recorder = active = Recorder()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        active = None
        backend = get_backend()
        rank, world_size = backend.rank(), backend.world_size()
        part = _write_part(target, rank, world_size, recorder.events)
        if failed:
            _log.warning(
                "[rank %d] the sd.trace() block raised, so its ranks did not merge their "
                "parts; this rank's is in %s. Merge what is there with: "
                "python -m syncdeco merge %s",
                rank,
                part,
                target,
                extra={"rank": rank},
            )
    barrier(_MERGE_POINT)
    if backend.rank() == 0:
        missing = merge(target, world_size=world_size)
        if missing:
            _log.warning(
                "[rank 0] the trace at %s lacks rank(s) %s: their parts were not found "
                "in %s. Give sd.trace() a path on a filesystem every rank shares.",
                target,
                missing,
                _parts_dir(target),
                extra={"rank": 0},
            )


def _parts_dir(target: Path) -> Path:
    return target.with_name(target.name + _PARTS_SUFFIX)


def _write_part(target: Path, rank: int, world_size: int, events: list[dict[str, Any]]) -> Path:
    from ._save import atomic_save

    parts = _parts_dir(target)
    parts.mkdir(parents=True, exist_ok=True)
    return atomic_save(
        {"rank": rank, "world_size": world_size, "events": events},
        parts / f"rank{rank}.json",
        save=_dump_json,
    )


def _dump_json(obj: object, file: IO[bytes]) -> None:
    file.write(json.dumps(obj).encode())


def merge(path: str | os.PathLike[str], *, world_size: int | None = None) -> list[int]:
    """Merge the per-rank parts in ``PATH.parts/`` into the Chrome trace
    ``PATH`` and remove the parts.  Returns the ranks whose part is missing
    (of ``world_size``, or of the world size the parts recorded)."""
    from ._save import atomic_save

    target = Path(path)
    parts_dir = _parts_dir(target)
    parts = [json.loads(p.read_text()) for p in sorted(parts_dir.glob("rank*.json"))]
    if not parts:
        raise SyncError(f"no trace parts to merge in {parts_dir}")
    size = world_size or max(p["world_size"] for p in parts)
    found = {p["rank"] for p in parts}
    events = [e for p in parts for e in p["events"]]
    start = min((e["ts"] for e in events), default=0.0)
    for event in events:
        event["ts"] -= start
    meta = []
    for rank in sorted(found):
        meta.append(
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}
        )
        meta.append(
            {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}
        )
    document = {
        "traceEvents": meta + sorted(events, key=lambda e: (e["pid"], e["ts"])),
        "displayTimeUnit": "ms",
        "otherData": {
            "producer": "syncdeco",
            "world_size": size,
            "epoch_us": start,  # wall-clock time of ts 0, microseconds since the epoch
        },
    }
    atomic_save(document, target, save=_dump_json)
    for part in parts_dir.glob("rank*.json"):
        part.unlink()
    with contextlib.suppress(OSError):
        parts_dir.rmdir()
    return [r for r in range(size) if r not in found]


# -- reading a trace ------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class PointStats:
    """One sync point (kind:name) over all its calls and ranks."""

    name: str
    location: str
    calls: int
    total_wait_ms: float  # summed over ranks and calls
    max_wait_ms: float
    median_spread_ms: float  # last arrival minus first, per call


@final
@dataclass(frozen=True, slots=True)
class StragglerStats:
    """How often one rank arrived last at a sync point, and by how much."""

    rank: int
    last_arrivals: int
    late_ms: float  # summed: its arrival minus the first rank's, when last


@final
@dataclass(frozen=True, slots=True)
class Summary:
    world_size: int
    points: list[PointStats]  # slowest (most total wait) first
    stragglers: list[StragglerStats]  # most late time first
    failures: list[str]  # "rank R at NAME: OUTCOME"


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A merged trace, checked to be a Chrome trace-event document."""
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise ValueError(f"{path} is not a Chrome trace-event JSON object (no traceEvents list)")
    return document


def summarize(path: str | os.PathLike[str]) -> Summary:
    """The slowest sync points and the straggler ranks of a merged trace."""
    document = load(path)
    syncs = [e for e in document["traceEvents"] if e.get("cat") == "sync"]
    meetings: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for event in syncs:
        args = event["args"]
        meetings[(event["name"], args["count"], args["scope"])].append(event)
    by_point: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for (name, _, _), events in meetings.items():
        by_point[name].append(events)
    points = []
    for name, calls in by_point.items():
        waits = [e["dur"] / 1000 for events in calls for e in events]
        spreads = [_spread(events) / 1000 for events in calls]
        points.append(
            PointStats(
                name=name,
                location=calls[0][0]["args"]["location"],
                calls=len(calls),
                total_wait_ms=sum(waits),
                max_wait_ms=max(waits),
                median_spread_ms=statistics.median(spreads),
            )
        )
    points.sort(key=lambda p: p.total_wait_ms, reverse=True)
    last: dict[int, list[float]] = defaultdict(list)
    for events in meetings.values():
        if len(events) > 1:
            latest = max(events, key=lambda e: e["ts"])
            last[latest["pid"]].append(_spread(events) / 1000)
    stragglers = [StragglerStats(r, len(late), sum(late)) for r, late in last.items()]
    stragglers.sort(key=lambda s: s.late_ms, reverse=True)
    failures = [
        f"rank {e['pid']} at {e['name']} (call {e['args']['count']}): {e['args']['outcome']}"
        for e in syncs
        if e["args"]["outcome"] != "ok"
    ]
    world_size = int(document.get("otherData", {}).get("world_size", 0))
    return Summary(world_size, points, stragglers, failures)


def _spread(events: list[dict[str, Any]]) -> float:
    arrivals = [e["ts"] for e in events]
    return float(max(arrivals) - min(arrivals))


def format_summary(summary: Summary, top: int = 10) -> str:
    """The summary as the text ``python -m syncdeco summary`` prints."""
    lines = [f"syncdeco trace: {summary.world_size} ranks, {len(summary.points)} sync points"]
    lines.append("")
    lines.append(f"slowest sync points (by time all ranks spent waiting), top {top}:")
    lines.append(
        f"  {'sync point':<40} {'calls':>6} {'wait ms':>10} {'max ms':>9} {'spread ms':>10}  where"
    )
    for p in summary.points[:top]:
        lines.append(
            f"  {p.name:<40} {p.calls:>6} {p.total_wait_ms:>10.1f} {p.max_wait_ms:>9.1f} "
            f"{p.median_spread_ms:>10.1f}  {p.location}"
        )
    lines.append("")
    lines.append("stragglers (the rank that arrived last, and how far behind the first):")
    if not summary.stragglers:
        lines.append("  none")
    for s in summary.stragglers[:top]:
        lines.append(
            f"  rank {s.rank:<4} last at {s.last_arrivals:>5} sync point(s), "
            f"{s.late_ms:>9.1f} ms behind in all"
        )
    if summary.failures:
        lines.append("")
        lines.append("sync points that failed:")
        lines.extend(f"  {f}" for f in summary.failures[:top])
    return "\n".join(lines)


def plot(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Draw the trace as a timeline PNG, one row per rank: time in decorated
    bodies in blue, time waiting at sync points in orange (red if it failed).
    Needs matplotlib: ``pip install "syncdeco[trace]"``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(
            'drawing a timeline needs matplotlib: pip install "syncdeco[trace]"'
        ) from exc
    document = load(path)
    events = [e for e in document["traceEvents"] if e.get("ph") == "X"]
    ranks = sorted({e["pid"] for e in events})
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.5 * len(ranks)))
    colours = {"run": "#4C72B0", "sync": "#DD8452"}
    for event in events:
        failed = event.get("args", {}).get("outcome", "ok") != "ok"
        colour = "#C44E52" if failed else colours.get(event["cat"], "#999999")
        height = 0.8 if event["cat"] == "sync" else 0.5
        ax.broken_barh(
            [(event["ts"] / 1e3, max(event["dur"] / 1e3, 0.05))],
            (event["pid"] - height / 2, height),
            facecolors=colour,
        )
    longest = sorted(
        (e for e in events if e["cat"] == "sync"), key=lambda e: e["dur"], reverse=True
    )[:3]
    for event in longest:
        ax.annotate(
            event["name"],
            (event["ts"] / 1e3, event["pid"] + 0.45),
            fontsize=7,
            va="bottom",
        )
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the first event")
    ax.set_title("syncdeco timeline: where each rank waited")
    ax.legend(
        handles=[
            Patch(color=colours["run"], label="in a decorated function"),
            Patch(color=colours["sync"], label="waiting at a sync point"),
            Patch(color="#C44E52", label="sync point that failed"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35 if len(ranks) < 4 else -0.15),
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    target = Path(out)
    fig.savefig(target, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target
