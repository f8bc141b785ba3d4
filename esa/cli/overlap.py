"""`esa overlap`: Jaccard, overlap coefficient, Spearman and Kendall between ranked lists (no torch)."""

from __future__ import annotations

import argparse

from esa.cli.options import HELP_FORMATTER, add_logging_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("overlap", help="overlap statistics between top_weights.csv lists",
                       formatter_class=HELP_FORMATTER,
                       description="Compare ranked lists (top_weights.csv files or the folders holding "
                       "them) pairwise at one granularity and write a JSON report.")
    p.add_argument("--lists", nargs="+", required=True, metavar="CSV", help="two or more top_weights.csv")
    p.add_argument("--by", default="parameter", choices=["parameter", "tensor", "layer"],
                   help="granularity: the exact weight, its tensor, or its transformer block")
    p.add_argument("--out", required=True, help="output JSON (e.g. overlap_report.json)")
    add_logging_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print the headline figures."""
    from esa.results.overlap import write_overlap_report

    report = write_overlap_report(args.lists, args.by, args.out)
    if not args.quiet:
        for pair in report["pairs"]:
            print(f"{pair['a']} vs {pair['b']}: jaccard {pair['jaccard']}, spearman {pair['spearman']}")
        print(f"wrote {args.out}")
    return 0
