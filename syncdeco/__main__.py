"""``python -m syncdeco``: read the traces ``sd.trace(path)`` writes.

python -m syncdeco summary trace.json [--top N]    slowest sync points, stragglers
python -m syncdeco plot trace.json -o timeline.png  timeline PNG (needs matplotlib)
python -m syncdeco merge trace.json                 merge parts a failed run left
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._errors import SyncError
from ._trace import format_summary, merge, plot, summarize


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m syncdeco",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="print the slowest sync points and stragglers")
    summary.add_argument("trace")
    summary.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    drawing = commands.add_parser("plot", help="draw a timeline PNG with matplotlib")
    drawing.add_argument("trace")
    drawing.add_argument("-o", "--output", required=True, help="the PNG to write")
    merging = commands.add_parser("merge", help="merge the per-rank parts in TRACE.parts/")
    merging.add_argument("trace")
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
