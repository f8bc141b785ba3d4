"""The `esa` command: one subcommand per module in esa/cli/, each building and running a manifest.

Heavy libraries (torch, transformers) are imported inside the handlers, so `esa --help` and
the analysis commands start fast and never load torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from esa import __version__
from esa.cli.options import HelpFormatter
from esa.core.errors import UserError

# Each module defines add_parser(subparsers); the order here is the order in `esa --help`.
_COMMAND_MODULES = ("tiny_model", "baseline", "profile", "perturb", "reduce", "overlap", "analyze", "run", "validate", "demo", "plan_memory")


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors are one line (plus a pointer to --help), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs test that lists every flag)."""
    import importlib

    parser = OneLineErrorParser(
        prog="esa", description="Extreme sensitivity analysis of causal language models: "
        "baseline (phase 1), profile (phase 2), perturb (phase 3), and the tools around them.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"esa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"esa.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn user errors into one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from esa.core.logs import setup_logging
    from esa.parallel.launch import detect_env

    env = detect_env()
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "quiet", False), env.rank)
    from esa.core.stop import EXIT_PREEMPTED, Preempted

    # Every rank of a sharded job prints its own one-line outcome; the others' say which rank they are.
    who = f"esa {args.command}" + (f" (rank {env.rank} of {env.world_size})" if env.rank else "")
    try:
        return int(args.func(args) or 0)
    except Preempted as exc:
        print(f"{who}: pre-empted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as exc:
        print(f"{who}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
