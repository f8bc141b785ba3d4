"""`esa run MANIFEST.json`: run one manifest file (what every array task does)."""

from __future__ import annotations

import argparse
import json

from esa.cli.options import HELP_FORMATTER, add_logging_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("run", help="run a manifest file", formatter_class=HELP_FORMATTER,
                       description="Run one job manifest (JSON). Every other command builds a "
                       "manifest and runs it the same way.")
    p.add_argument("manifest", help="path to the manifest JSON")
    add_logging_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the manifest as a job (EsaTask: stop signals, checkpoint, requeue) and print its summary."""
    from jobs.task import EsaTask

    result = EsaTask(args.manifest)()
    if not args.quiet:
        print(json.dumps(result["summary"], indent=2, default=str))
    return 0
