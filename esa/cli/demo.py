"""`esa demo`: the whole job on the built-in tiny model, locally and offline."""

from __future__ import annotations

import argparse

from esa.cli.options import HELP_FORMATTER, add_logging_flags, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("demo", help="run the pipeline on the built-in tiny model and write a report",
                       formatter_class=HELP_FORMATTER,
                       description="Build (once, cached) a tiny Llama trained on the built-in corpus and run the "
                       "plans of manifests/demo/ in this process: phase 1, phase 2 (two metrics x two seeds), "
                       "phase 3 (zero and sign_flip against controls) on held-out text, and the offline "
                       "analysis; prints the path of report.html.")
    p.add_argument("--out-dir", default=None, help="run folder (default: $ESA_RUNS/demo or ./runs/demo)")
    p.add_argument("--train-steps", type=positive_int, default=None,
                   help="training steps of the tiny model (default: 300, the cached esa:tiny-llama)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window (default: the plans', 128)")
    p.add_argument("--max-samples", type=positive_int, default=None,
                   help="evaluation windows (default: the plans', 64)")
    p.add_argument("--control-repeats", type=positive_int, default=None,
                   help="draws of the random control (default: the plan's, 20)")
    add_logging_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where the report is."""
    from jobs.demo import run_demo

    report = run_demo(out_dir=args.out_dir, train_steps=args.train_steps, seq_len=args.seq_len,
                      max_samples=args.max_samples, control_repeats=args.control_repeats)
    print(f"report: {report.resolve()}")
    return 0
