"""``python -m analysis RUN``: write RUN/report/ and print the path of report.html."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    """The argument parser (shared with `esa analyze`)."""
    p = argparse.ArgumentParser(prog=prog, description="Aggregate the finished jobs of a run "
                                "folder into overlap, stability and ΔPPL tables, plots and a "
                                "report (report.md, self-contained report.html).")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RUN and --out."""
    p.add_argument("run", metavar="RUN", help="run folder (runs/<experiment>, or any folder "
                   "holding job output folders)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: RUN/report)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any job is not done (failed, "
                   "corrupt, missing, incomplete, pre-empted)")


def finish(path: object, counts: dict[str, int], strict: bool, prog: str = "analysis") -> int:
    """Print the report's path (stdout) and the job summary (stderr); the exit code (--strict: 1
    unless every job is done)."""
    from analysis.report import summary_line
    from esa.results.state import DONE

    print(path)
    not_done = sum(n for state, n in counts.items() if state != DONE)
    print(summary_line(counts), file=sys.stderr)
    if strict and not_done:
        print(f"{prog}: --strict: {not_done} job(s) are not done", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Build the report; a user error is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    from pathlib import Path

    if not Path(args.run).is_dir():  # answered before the heavy imports
        print(f"analysis: error: run folder {args.run} does not exist or is not a folder",
              file=sys.stderr)
        return 2
    from analysis.report import write_report
    from esa.core.errors import UserError, os_error_line

    try:
        path, counts = write_report(args.run, args.out)
    except UserError as exc:
        print(f"analysis: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"analysis: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    return finish(path, counts, args.strict)


if __name__ == "__main__":
    raise SystemExit(main())
