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
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, TypeVar, final

from ._backend import Backend, Failure, SyncPoint
from ._env import node_key
from ._errors import PeerFailedError, SyncError, SyncMismatchError, SyncTimeoutError

__all__ = ["Recorder", "active", "merge", "plot", "summarize"]

_log = logging.getLogger("syncdeco")

# Errors that carry another rank's failure, not this rank's own.
_RELAYED: Final = ("PeerFailedError", "RankExitedError")

R = TypeVar("R")

_PARTS_SUFFIX: Final = ".parts"
_PRODUCER: Final = "syncdeco"

# A sync point: (point, start ns, end ns, local, outcome, what this rank
# raised there or None); a decorated body: (name, start ns, end ns).  Plain
# tuples keep a long block's memory down (about 200 bytes an event); the
# trace's dicts are built when the part is written.
_Sync = tuple[SyncPoint, int, int, bool, str, "str | None"]
_Run = tuple[str, int, int]


@final
class Recorder:
    """The events of one rank.  Times are wall-clock nanoseconds, so ranks
    on one host (or on hosts with synchronised clocks) line up."""

    __slots__ = ("events", "unmet")

    def __init__(self) -> None:
        self.events: list[_Sync | _Run] = []
        # A sync point of this block ended in a timeout or a mismatch: the
        # ranks may be out of step (or gone), and must not count on meeting.
        self.unmet = False

    def sync(
        self,
        backend: Backend,
        point: SyncPoint,
        *,
        local: bool,
        failure: Failure | None,
        payload: object,
        timeout: float | None,
    ) -> object:
        """``backend.sync(...)``, recorded."""
        arrived = time.time_ns()
        outcome = "ok"
        try:
            return backend.sync(
                point, local=local, failure=failure, payload=payload, timeout=timeout
            )
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}".split("\n")[0]
            if isinstance(exc, (SyncTimeoutError, SyncMismatchError)) or (
                isinstance(exc, PeerFailedError) and exc.out_of_step
            ):
                self.unmet = True  # the ranks will not meet in step at the block's end
            raise
        finally:
            # what this rank raised and told the others of here, if anything
            raised = None
            if failure is not None and failure.exc_type not in _RELAYED:
                raised = f"{failure.exc_type}: {failure.message}".split("\n")[0]
            self.events.append((point, arrived, time.time_ns(), local, outcome, raised))

    def body(self, name: str, call: Callable[[], R]) -> R:
        """``call()``: the body of a decorated function, recorded."""
        started = time.time_ns()
        try:
            return call()
        finally:
            self.events.append((name, started, time.time_ns()))

    async def body_async(self, name: str, call: Callable[[], Awaitable[R]]) -> R:
        started = time.time_ns()
        try:
            return await call()
        finally:
            self.events.append((name, started, time.time_ns()))

    def chrome_events(self, rank: int) -> list[dict[str, Any]]:
        node = f"node {node_key(os.environ)}"  # the scope of a local=True sync point
        out = []
        for event in self.events:
            start, end = event[1], event[2]
            common = {"ph": "X", "ts": start / 1000, "dur": (end - start) / 1000}
            if len(event) == 3:
                out.append({"name": event[0], "cat": "run", **common, "pid": rank, "tid": 0})
                continue
            point, _, _, local, outcome, raised = event
            args: dict[str, object] = {
                "count": point.count,
                "location": point.location,
                "scope": node if local else "world",  # the ranks that meet there
                "outcome": outcome,
            }
            if raised is not None:
                args["raised"] = raised
            name = f"{point.kind}:{point.name}"
            out.append({"name": name, "cat": "sync", **common, "pid": rank, "tid": 0, "args": args})
        return out


active: Recorder | None = None
"""The recorder of the :func:`trace` block this process is in, if any.  It
records the sync points of every thread of the process."""

starting = threading.Lock()  # held while a trace block starts


def parts_dir(target: Path) -> Path:
    return target.with_name(target.name + _PARTS_SUFFIX)


def write_part(target: Path, rank: int, world_size: int, events: list[dict[str, Any]]) -> Path:
    from ._save import atomic_save

    parts = parts_dir(target)
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
    ``PATH``; remove the parts it used once every rank's part was there (else
    they stay, so a later merge has them all).  ``world_size`` (default: what
    the newest part recorded) says which ranks belong; parts of other sizes
    are left alone.  Returns the ranks whose part is missing."""
    from ._save import atomic_save

    target = Path(path)
    parts = parts_dir(target)
    found: dict[Path, dict[str, Any]] = {}
    for file in sorted(parts.glob("rank*.json")):
        try:
            part = json.loads(file.read_text())
            if isinstance(part["rank"], int) and isinstance(part["world_size"], int):
                part["events"] = list(part["events"])
                found[file] = part
        except (OSError, ValueError, KeyError, TypeError):
            _log.warning("skipping %s: not a trace part syncdeco wrote", file)
    if not found:
        raise SyncError(f"no trace parts to merge in {parts}")
    # Without a world size, the newest part says which run this is.
    size = world_size or found[max(found, key=lambda f: f.stat().st_mtime_ns)]["world_size"]
    used = {f: p for f, p in found.items() if p["world_size"] == size and 0 <= p["rank"] < size}
    ranks = sorted(p["rank"] for p in used.values())
    events = [e for p in used.values() for e in p["events"]]
    start = min((e["ts"] for e in events), default=0.0)
    for event in events:
        event["ts"] -= start
    meta = []
    for rank in ranks:  # name the rows "rank R", in rank order
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
            "producer": _PRODUCER,
            "world_size": size,
            "epoch_us": start,  # wall-clock time of ts 0, microseconds since the epoch
        },
    }
    atomic_save(document, target, save=_dump_json)
    missing = [r for r in range(size) if r not in ranks]
    if not missing:  # else the parts stay, for a merge once the others are there
        for file in used:
            file.unlink()
        with contextlib.suppress(OSError):
            parts.rmdir()  # only if nothing else is left in it
    return missing


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
    if document.get("otherData", {}).get("producer") != _PRODUCER:
        raise ValueError(
            f"{path} is a Chrome trace, but not one sd.trace() wrote (no "
            f'otherData.producer == "{_PRODUCER}"); syncdeco reads only its own'
        )
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
                calls=len({events[0]["args"]["count"] for events in calls}),
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
    # The ranks that raised first, then what the others were told.
    failures = [
        f"rank {e['pid']} raised {e['args']['raised']} (reported at {e['name']}, "
        f"call {e['args']['count']})"
        for e in syncs
        if "raised" in e["args"]
    ] + [
        f"rank {e['pid']} at {e['name']} (call {e['args']['count']}): {e['args']['outcome']}"
        for e in syncs
        if e["args"]["outcome"] != "ok"
    ]
    world_size = int(document.get("otherData", {}).get("world_size", 0))
    return Summary(world_size, points, stragglers, failures)


def _spread(events: list[dict[str, Any]]) -> float:
    arrivals = [e["ts"] for e in events]
    return float(max(arrivals) - min(arrivals))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_summary(summary: Summary, top: int = 10) -> str:
    """The summary as the text ``python -m syncdeco summary`` prints."""
    lines = [
        f"syncdeco trace: {_plural(summary.world_size, 'rank')}, "
        f"{_plural(len(summary.points), 'sync point')}"
    ]
    lines.append("")
    lines.append(f"slowest sync points (by time all ranks spent waiting), top {top}:")
    shown = summary.points[:top]
    width = max([len("sync point"), *(len(p.name) for p in shown)])
    lines.append(
        f"  {'sync point':<{width}} {'calls':>6} {'wait ms':>10} {'max ms':>9} "
        f"{'spread ms':>10}  where"
    )
    for p in shown:
        lines.append(
            f"  {p.name:<{width}} {p.calls:>6} {p.total_wait_ms:>10.1f} {p.max_wait_ms:>9.1f} "
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


# Sync points get these colours, the ones where the ranks waited longest
# first; decorated bodies are the light blue, a failure is outlined in red.
_PALETTE: Final = (
    "#DD8452",
    "#55A868",
    "#8172B3",
    "#CCB974",
    "#DA8BC3",
    "#64B5CD",
    "#937860",
    "#E5AE38",
    "#6D904F",
    "#8C8C8C",
)
_BODY: Final = "#A9BCDB"
_FAILED: Final = "#C44E52"
_OTHERS: Final = "#5A5A5A"


def _short(name: str) -> str:
    """``kind:module.func`` or ``module.func`` without the module."""
    kind, _, rest = name.rpartition(":")
    rest = rest.rpartition(".")[2] if "." in rest and " " not in rest else rest
    return f"{kind}:{rest}" if kind else rest


def plot(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Draw the trace as a timeline PNG, one row per rank: time in decorated
    bodies in light blue, labelled where the name fits; time waiting at sync
    points in one colour per sync point, named in the legend with its
    kind, place and total wait (a short wait is drawn at least a few pixels
    wide); a sync point that failed is outlined in red.
    Needs matplotlib: ``pip install "syncdeco[trace]"``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch, Rectangle
    except ImportError as exc:
        raise ImportError(
            'drawing a timeline needs matplotlib: pip install "syncdeco[trace]" (in a '
            'checkout: pip install -e ".[trace]")'
        ) from exc
    document = load(path)
    events = [e for e in document["traceEvents"] if e.get("ph") == "X"]
    ranks = sorted({e["pid"] for e in events})
    syncs = [e for e in events if e["cat"] == "sync"]
    waited: dict[str, float] = defaultdict(float)
    where: dict[str, str] = {}
    for event in syncs:
        waited[event["name"]] += event["dur"] / 1e3
        where.setdefault(event["name"], event.get("args", {}).get("location", ""))
    named = sorted(waited, key=lambda n: -waited[n])
    colour = {n: _PALETTE[i] for i, n in enumerate(named[: len(_PALETTE)])}
    end = max((e["ts"] + e["dur"] for e in events), default=1.0) / 1e3
    shortest = max(end, 1e-3) / 300  # a wait is drawn at least about 3 pixels wide

    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.55 * max(len(ranks), 2)), layout="constrained")
    bars: list[tuple[dict[str, Any], float, float, float]] = []  # event, x, width, y
    failed_any = False
    for event in sorted(events, key=lambda e: e["cat"] == "sync"):  # waits on top
        x, width = event["ts"] / 1e3, event["dur"] / 1e3
        failed = event.get("args", {}).get("outcome", "ok") != "ok"
        failed_any |= failed
        if event["cat"] == "sync":
            # a failed wait is drawn wider, so its colour shows inside the outline
            width, height = max(width, shortest * (3 if failed else 1)), 0.8
            face = colour.get(event["name"], _OTHERS)
        else:
            height, face = 0.5, _BODY
        ax.add_patch(
            Rectangle(
                (x, event["pid"] - height / 2),
                width,
                height,
                facecolor=face,
                edgecolor=_FAILED if failed else "white",
                linewidth=2.0 if failed else 0.4,
            )
        )
        bars.append((event, x, width, event["pid"]))
    ax.set_xlim(0, max((x + w for _, x, w, _ in bars), default=end) * 1.01)
    ax.set_ylim(max(ranks, default=0) + 0.7, min(ranks, default=0) - 0.7)  # rank 0 on top
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_xlabel("milliseconds since the first event")
    ax.set_title("syncdeco timeline: where each rank waited")
    handles = [Patch(facecolor=_BODY, label="in a decorated function (name inside, if it fits)")]
    for name in named[: len(_PALETTE)]:
        kind, _, short = _short(name).partition(":")
        place = f" ({where[name]})" if where[name] else ""
        handles.append(
            Patch(
                facecolor=colour[name],
                label=f"waiting at {kind} {short}{place}: {waited[name]:.1f} ms in all",
            )
        )
    if len(named) > len(_PALETTE):
        handles.append(
            Patch(
                facecolor=_OTHERS,
                label=f"waiting at {len(named) - len(_PALETTE)} other sync points",
            )
        )
    if failed_any:
        handles.append(
            Patch(
                facecolor="white", edgecolor=_FAILED, linewidth=2.0, label="sync point that failed"
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.canvas.draw()  # lay out, so that a label can be measured against its bar
    # A bar's name goes inside it only where it fits.
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for event, x, width, y in bars:
        left, right = (ax.transData.transform((v, y))[0] for v in (x, x + width))
        if right - left < 20:
            continue
        text = ax.text(
            x + width / 2,
            y,
            _short(event["name"]).rpartition(":")[2],
            ha="center",
            va="center",
            fontsize=7,
            clip_on=True,
        )
        if text.get_window_extent(renderer).width > right - left - 8:
            text.remove()
    target = Path(out)
    fig.savefig(target, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target
