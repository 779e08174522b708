"""What ``python -m syncdeco where`` prints: the ranks grouped by where they
are, as text or as data.  Pure functions over the reports the ranks gave
(``_plane.stacks.StackReport``); no store, no torch.

Ranks with the same stack (and, inside a sync point of syncdeco's, the same
one) form one group, headed by what its ranks are doing::

    ranks 0-6, 8-15: all_reduce in train.py:88 (step)
    rank 7: read_shard in data.py:31

``all_reduce`` is the function the innermost frame of the user's own code
called (the first frame inside it that is not a generic wrapper), and the
head names that frame; a rank whose innermost frame is the user's (in a C
call such as ``time.sleep``) is headed by that frame alone.  Each rank of a
group then gets a line (host, pid, the sync point it is in or last left),
and the group its stack once, innermost user frame first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, final

from ._errors import rank_ranges
from ._plane.stacks import StackReport, SyncSeen, is_syncdeco_file, is_user_file

__all__ = ["Group", "as_data", "format_where", "group", "parse_stack", "rank_ranges"]

# Functions that only pass a call on (decorators' inner functions): the
# head names the function they call instead.
_PASSING: Final = frozenset({
    "wrapper", "wrapped", "inner", "_fn", "decorate_context", "__call__",
    "_call_impl", "_wrapped_call_impl", "_exception_logger", "_time_logger",
})  # fmt: skip
_FILE_LINE: Final = re.compile(
    r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>.+?)\s*$'
)

Frame = tuple[str, int, str, str | None]  # file, line, function, source line


def parse_stack(stack: str) -> list[Frame]:
    """The frames of a stack as ``StackReport.stack`` formats it (a
    traceback's ``File ...`` lines, each maybe followed by its source line),
    outermost first."""
    frames: list[Frame] = []
    lines = stack.splitlines()
    for i, line in enumerate(lines):
        m = _FILE_LINE.match(line)
        if m is None:
            continue
        source = None
        if i + 1 < len(lines) and not _FILE_LINE.match(lines[i + 1]):
            text = lines[i + 1].strip()
            source = text if text and not text.startswith("...") else None
        frames.append((m["file"], int(m["line"]), m["function"], source))
    return frames


def _user_index(frames: Sequence[Frame], user: tuple[str, int, str] | None) -> int | None:
    """Where the innermost user frame is in ``frames`` (as the rank said,
    else as this host classifies them)."""
    for i in range(len(frames) - 1, -1, -1):
        if user is not None and frames[i][:3] == user:
            return i
    if user is None:
        for i in range(len(frames) - 1, -1, -1):
            if is_user_file(frames[i][0]):
                return i
    return None


def _called(inner: Sequence[Frame]) -> str | None:
    """The function a user frame called: the outermost of the frames inside
    it that is not a mere wrapper."""
    for frame in inner:
        if frame[2] not in _PASSING:
            return frame[2]
    return inner[0][2] if inner else None


@final
@dataclass(frozen=True, slots=True)
class Group:
    """Ranks at one place: ``head`` says where (without the ranks), ``stack``
    lists its frames innermost user frame first (empty for ranks that did
    not answer), ``hidden`` counts the frames inside that user frame left
    out (the library's), ``wrappers`` syncdeco's own frames left out of the
    stack (a decorated function's wrapper), ``reports`` are the ranks'."""

    head: str
    stack: tuple[Frame, ...]
    hidden: int
    reports: tuple[StackReport, ...]
    wrappers: int = 0

    @property
    def ranks(self) -> list[int]:
        return [r.rank for r in self.reports]

    @property
    def title(self) -> str:
        ranks = self.ranks
        who = f"ranks {rank_ranges(ranks)}" if len(ranks) > 1 else f"rank {ranks[0]}"
        return f"{who}: {self.head}"


def _place(report: StackReport) -> tuple[str, tuple[Frame, ...], int, int]:
    """(head, stack innermost user frame first, frames hidden inside it,
    syncdeco's frames left out of it) of a rank that answered."""
    frames = parse_stack(report.stack or "")
    at = _user_index(frames, report.frame)
    if at is None:
        inner = frames[-1] if frames else None
        head = "outside the user's code" + (
            f": {inner[2]} in {os.path.basename(inner[0])}:{inner[1]}" if inner else ""
        )
        return head, tuple(reversed(frames)), 0, 0
    file, line, function, _ = frames[at]
    inside = frames[at + 1 :]
    called = _called(inside)
    where = f"{os.path.basename(file)}:{line}"
    if report.in_syncdeco and report.sync is not None and report.sync.inside:
        head = f"{report.sync.point}, in {where} ({function})"
    elif called is not None:
        head = f"{called} in {where} ({function})"
    else:
        head = f"{function} in {where}"
    outer = frames[: at + 1]
    shown = tuple(f for f in reversed(outer) if not is_syncdeco_file(f[0]))
    return head, shown, len(inside), len(outer) - len(shown)


def group(reports: Mapping[int, StackReport]) -> list[Group]:
    """The ranks grouped by where they are, groups in order of their lowest
    rank: ranks that answered with the same stack (frames compared by file
    name, line and function) and head; ranks that exited; ranks without a
    responder; each silent rank alone (its reason names its process)."""
    keyed: dict[tuple[Any, ...], tuple[str, tuple[Frame, ...], int, int, list[StackReport]]] = {}
    for rank in sorted(reports):
        report = reports[rank]
        wrappers = 0
        if report.answered:
            head, stack, hidden, wrappers = _place(report)
            shape = tuple((os.path.basename(f), n, fn) for f, n, fn, _ in stack)
            key: tuple[Any, ...] = ("at", head, shape, hidden, wrappers)
        elif report.ended:
            head, stack, hidden, key = "exited", (), 0, ("ended",)
        elif report.host is None:
            head, stack, hidden, key = str(report.reason), (), 0, ("none", report.reason)
        else:
            head, stack, hidden, key = f"silent: {report.reason}", (), 0, ("silent", rank)
        keyed.setdefault(key, (head, stack, hidden, wrappers, []))[4].append(report)
    groups = [Group(h, s, n, tuple(rs), w) for h, s, n, w, rs in keyed.values()]
    groups.sort(key=lambda g: g.ranks[0])
    return groups


def _ago(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def _sync_words(sync: SyncSeen | None, age: float | None = None) -> str:
    """Where ``sync`` says a rank was, in its answer now or (``age``) one
    given that many seconds ago."""
    if sync is None:
        return "no sync point passed yet"
    if sync.inside:
        return f"{'' if age is None else 'then '}in {sync.point} for {_ago(sync.seconds)}"
    return f"last passed {sync.point} {_ago(sync.seconds + (age or 0.0))} ago"


def _rank_line(report: StackReport, last: StackReport | None) -> str:
    parts = [f"rank {report.rank}:"]
    if report.host is not None:
        parts.append(f"host {report.host}, pid {report.pid}")
    if report.answered:
        parts.append(_sync_words(report.sync))
    elif last is not None and last.age is not None and last.answered:
        head = _place(last)[0]
        parts.append(f"last seen {_ago(last.age)} ago: {head}; {_sync_words(last.sync, last.age)}")
    elif last is not None and last.age is not None:
        parts.append(
            f"last seen {_ago(last.age)} ago, at its first syncdeco sync point (where "
            f"it started answering)"
        )
    line = parts[0] + " " + ", ".join(parts[1:]) if len(parts) > 1 else parts[0]
    return line


def _frame_line(frame: Frame) -> str:
    file, line, function, source = frame
    return f"{file}:{line} in {function}" + (f": {source}" if source else "")


def format_where(
    reports: Mapping[int, StackReport],
    *,
    heading: str,
    last: Mapping[int, StackReport] | None = None,
) -> str:
    """The text ``where`` prints: ``heading``, then each group."""
    last = last or {}
    out = [heading]
    for g in group(reports):
        out.append("")
        out.append(g.title)
        out += ["  " + _rank_line(r, last.get(r.rank)) for r in g.reports]
        if g.stack:
            parts = [f"{g.hidden} frame(s) inside it"] * bool(g.hidden)
            parts += [f"{g.wrappers} of syncdeco's"] * bool(g.wrappers)
            left_out = f" ({' and '.join(parts)} not shown)" if parts else ""
            out.append(f"  stack, innermost user frame first{left_out}:")
            out += ["    " + _frame_line(f) for f in g.stack]
    return "\n".join(out) + "\n"


def heading(job: str, store: str, reports: Mapping[int, StackReport], took: float) -> str:
    """The first line: the job (``job``: "torchrun job 42"), its store, and
    how many ranks answered."""
    answered = sum(r.answered for r in reports.values())
    ended = sum(r.ended for r in reports.values())
    silent = len(reports) - answered - ended
    counts = [f"{answered} answered"]
    if silent:
        counts.append(f"{silent} silent")
    if ended:
        counts.append(f"{ended} exited")
    return (
        f"{job} at {store}: {len(reports)} ranks, {', '.join(counts)} "
        f"(asked in {took * 1000:.0f} ms)"
    )


def _report_data(report: StackReport, last: StackReport | None) -> dict[str, Any]:
    sync = report.sync
    data: dict[str, Any] = {
        "rank": report.rank,
        "host": report.host,
        "pid": report.pid,
        "answered": report.answered,
        "ended": report.ended,
        "reason": report.reason,
        "sync_point": None
        if sync is None
        else {"name": sync.point, "inside": sync.inside, "seconds": round(sync.seconds, 3)},
        "user_frame": None
        if report.frame is None
        else {"file": report.frame[0], "line": report.frame[1], "function": report.frame[2]},
        "in_syncdeco": report.in_syncdeco,
        "stack": report.stack,
    }
    if last is not None:
        data["last_seen"] = {"seconds_ago": last.age, **_report_data(last, None)}
    return data


def as_data(
    reports: Mapping[int, StackReport],
    *,
    job: str,
    store: str,
    took: float,
    asked_at: float,
    last: Mapping[int, StackReport] | None = None,
) -> dict[str, Any]:
    """What ``where --json`` prints: the same as the text, as data."""
    last = last or {}
    return {
        "job": job,
        "store": store,
        "asked_at": asked_at,
        "took_s": round(took, 4),
        "world_size": len(reports),
        "groups": [
            {
                "ranks": g.ranks,
                "where": g.head,
                "stack": [
                    {"file": f, "line": n, "function": fn, "source": src}
                    for f, n, fn, src in g.stack
                ],
                "frames_inside_not_shown": g.hidden,
                "syncdeco_frames_not_shown": g.wrappers,
            }
            for g in group(reports)
        ],
        "ranks": [_report_data(r, last.get(r.rank)) for _, r in sorted(reports.items())],
    }
