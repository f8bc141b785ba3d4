"""`esa analyze RUN`: the offline report over a run folder (the analysis package; no torch)."""

from __future__ import annotations

import argparse

from esa.cli.options import HELP_FORMATTER


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    from analysis.__main__ import add_arguments

    p = sub.add_parser("analyze", help="aggregate finished jobs into report.md / report.html",
                       formatter_class=HELP_FORMATTER,
                       description="Read the result files under RUN (never a model) and write "
                       "RUN/report/: job table, overlap, stability and ΔPPL tables, plots, "
                       "report.md and a self-contained report.html.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the report, print the path of report.html and the job summary (--strict: exit 1 unless all done)."""
    from analysis.__main__ import finish
    from analysis.report import write_report

    path, counts = write_report(args.run, args.out)
    return finish(path, counts, args.strict, prog="esa analyze")
