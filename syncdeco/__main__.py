"""``python -m syncdeco``: read the traces ``sd.trace(path)`` writes, and
show where every rank of a running job is (``where``).

Its ``--help`` (:data:`DESCRIPTION`, :data:`EXAMPLES`) is plain text for a terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._errors import SyncError
from ._trace import format_summary, merge, plot, summarize

DESCRIPTION = """\
Read the trace files that syncdeco.trace(path) writes: where the ranks waited,
for how long, and which rank the others waited for. Or show where every rank
of a running job is now (where)."""

EXAMPLES = """\
examples:
  python -m syncdeco summary trace.json --top 5
  python -m syncdeco plot trace.json -o timeline.png
  python -m syncdeco merge trace.json
  python -m syncdeco where
  python -m syncdeco where --store node0:29500 --json

'python -m syncdeco COMMAND --help' lists a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m syncdeco",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trace_help = "the JSON file syncdeco.trace() wrote"
    summary = commands.add_parser(
        "summary",
        help="print the slowest sync points and stragglers",
        description="Print the slowest sync points and the ranks the others waited for.",
    )
    summary.add_argument("trace", metavar="TRACE", help=trace_help)
    summary.add_argument(
        "--top", type=int, default=10, metavar="N", help="rows per table (default 10)"
    )
    drawing = commands.add_parser(
        "plot",
        help="draw a timeline PNG (needs matplotlib)",
        description="Draw one bar per rank and sync point on a timeline PNG "
        '(needs matplotlib: pip install "syncdeco[trace]").',
    )
    drawing.add_argument("trace", metavar="TRACE", help=trace_help)
    drawing.add_argument("-o", "--output", required=True, metavar="PNG", help="the PNG to write")
    merging = commands.add_parser(
        "merge",
        help="merge the per-rank parts that a failed run left in TRACE.parts/",
        description="Merge the per-rank parts that a failed run left in TRACE.parts/ into TRACE.",
    )
    merging.add_argument("trace", metavar="TRACE", help=trace_help)
    finding = commands.add_parser(
        "where",
        help="show where every rank of a running job is now",
        description="Ask every rank of a running job (on any of its nodes) where its "
        "main thread is: its host, pid, the sync point it is in or last passed, and "
        "its Python stack, ranks at the same place grouped. With no option it finds "
        "the job from the ranks running on this machine. It only reads: the job "
        "goes on as before. A rank that does not answer within 2 s is listed as "
        "silent. Exit status 1: no job found, or the job has ended.",
    )
    finding.add_argument(
        "--store",
        metavar="HOST:PORT",
        help="the job's store: torchrun's --rdzv-endpoint, or MASTER_ADDR:MASTER_PORT",
    )
    finding.add_argument(
        "--job", metavar="ID", help="the job to show, where several are found (part of its id)"
    )
    finding.add_argument(
        "--pid", type=int, metavar="PID", help="the job of this rank's process (on this machine)"
    )
    finding.add_argument("--json", action="store_true", help="print the same as JSON")
    args = parser.parse_args(argv)
    if args.command == "where":
        return _where(args)
    try:
        if args.command == "summary":
            print(format_summary(summarize(args.trace), args.top))
        elif args.command == "plot":
            print(f"wrote {plot(args.trace, args.output)}")
        else:
            missing = merge(args.trace)
            print(
                f"merged into {args.trace}"
                + (f"; no part from rank(s) {missing}" if missing else "")
            )
    except BrokenPipeError:  # the reader went away (`| head`): not an error
        sys.stderr.close()  # and nothing more to say at exit
        return 0
    except (OSError, ValueError, KeyError, ImportError, SyncError) as exc:
        print(f"python -m syncdeco {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _where(args: argparse.Namespace) -> int:
    from ._where import WhereError, where

    try:
        sys.stdout.write(where(store=args.store, job=args.job, pid=args.pid, data=args.json))
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except WhereError as exc:
        print(f"python -m syncdeco where: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
