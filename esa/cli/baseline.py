"""`esa baseline`: phase 1, the unmodified model's reference perplexity / NLL / accuracy."""

from __future__ import annotations

import argparse
import json

from esa.cli.options import (HELP_FORMATTER, add_data_flags, add_logging_flags, add_model_flags, build_manifest,
                             default_out_dir)
from esa.spec.manifest import Manifest


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("baseline", help="phase 1: reference PPL, NLL and token accuracy",
                       description="Phase 1: evaluate the unmodified model. Writes OUT/eval.json, "
                       "OUT/experiment_manifest.json and OUT/config.json.", formatter_class=HELP_FORMATTER)
    add_model_flags(p)
    add_data_flags(p, phase=1)
    p.add_argument("--seed", type=int, default=None, help="random seed (phase 1 itself draws nothing)")
    p.add_argument("--out-dir", default=None, help="output folder (default: outputs/<model name>/baseline)")
    p.add_argument("--experiment", default=None, help="experiment name recorded in the manifest")
    add_logging_flags(p)
    p.set_defaults(func=run)


def manifest_of(args: argparse.Namespace) -> Manifest:
    """The phase-1 manifest these flags describe."""
    return build_manifest(1, args, args.out_dir or default_out_dir(args, "baseline"))


def run(args: argparse.Namespace) -> int:
    """Build the manifest and run it."""
    from esa.runner import run as run_manifest

    summary = run_manifest(manifest_of(args))
    if not args.quiet:
        print(json.dumps({k: summary[k] for k in ("ppl", "nll", "token_accuracy", "n_tokens", "n_windows")}, indent=2))
        print(f"wrote {summary['eval_json']}")
    return 0
