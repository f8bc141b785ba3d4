"""`esa reduce`: sum phase-2 data shards into one scores.h5."""

from __future__ import annotations

import argparse

from esa.cli.options import HELP_FORMATTER, add_logging_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("reduce", help="sum phase-2 shards (--shard i/n) into one scores.h5",
                       formatter_class=HELP_FORMATTER,
                       description="Sum the additive accumulators of `esa profile --shard i/n` jobs and "
                       "write the final OUT/scores.h5, equal to an unsharded run (ablation shards, which "
                       "split the candidates, are merged row by row; ablation.csv is written too).")
    p.add_argument("shards", nargs="+", help="the shards' scores.h5 files or their folders")
    p.add_argument("--out-dir", required=True, help="output folder")
    add_logging_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Reduce and print where the scores are."""
    from esa.profile.reduce import reduce_shards

    summary = reduce_shards(args.shards, args.out_dir)
    if not args.quiet:
        print(f"wrote {summary['files']['scores']}")
    return 0
