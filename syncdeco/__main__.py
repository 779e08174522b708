"""``python -m syncdeco``: read the traces ``sd.trace(path)`` writes.

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
for how long, and which rank the others waited for."""

EXAMPLES = """\
examples:
  python -m syncdeco summary trace.json --top 5
  python -m syncdeco plot trace.json -o timeline.png
  python -m syncdeco merge trace.json

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
