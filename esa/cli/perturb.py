"""`esa perturb`: phase 3 on explicit targets, a target list, or the top-k of a scores.h5."""

from __future__ import annotations

import argparse
import json

from esa.cli.options import HELP_FORMATTER, add_data_flags, add_logging_flags, add_model_flags, positive_int
from esa.cli.perturb_options import add_perturbation_flags, phase3_manifest


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("perturb", help="phase 3: perturb weights, ΔPPL against controls",
                       formatter_class=HELP_FORMATTER,
                       description="Phase 3: perturb the target weights in place, evaluate, restore them "
                       "bit-exactly, and compare with matched controls. Writes OUT/perturbation.json.")
    add_model_flags(p)
    add_data_flags(p)
    add_perturbation_flags(p, required=True)
    t = p.add_argument_group("targets")
    t.add_argument("--target", action="append", default=None, metavar="PARAM:I,J",
                   help="a weight, e.g. model.embed_tokens.weight:128000,3303; repeatable")
    t.add_argument("--target-list", "--target_list", dest="target_list", default=None, metavar="CSV",
                   help="CSV with the columns of top_weights.csv, or param,index")
    t.add_argument("--from-scores", default=None, metavar="SCORES_H5", help="take the top-k of this ranking")
    t.add_argument("--topk", type=positive_int, default=None, help="with --from-scores: how many (default: all ranked)")
    t.add_argument("--mode", default=None, choices=["per_layer", "global"],
                   help="with --from-scores: the ranking mode it must hold")
    p.add_argument("--seed", type=int, default=0, help="seed of random perturbations and control draws")
    p.add_argument("--out-dir", default=None, help="output folder (default: outputs/<model name>/perturb_<name>)")
    p.add_argument("--save-plots", action="store_true", help="draw the target ΔPPL against the controls")
    p.add_argument("--experiment", default=None, help="experiment name recorded in the manifest")
    add_logging_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the phase-3 manifest and run it."""
    from esa.errors import UserError
    from esa.runner import run as run_manifest

    if not (args.target or args.target_list or args.from_scores):
        raise UserError("no targets: give --target PARAM:I,J, --target-list CSV or --from-scores scores.h5")
    from esa.cli.options import default_out_dir

    out_dir = args.out_dir or default_out_dir(args, f"perturb_{args.perturb}")
    manifest = phase3_manifest(args, seed=args.seed, out_dir=out_dir, targets=args.target,
                               target_list=args.target_list, from_scores=args.from_scores)
    summary = run_manifest(manifest)
    if not args.quiet:
        print(json.dumps({k: summary[k] for k in ("baseline_ppl", "perturbed_ppl", "delta_ppl", "delta_nll",
                                                  "controls")}, indent=2, default=str))
        print(f"wrote {summary['perturbation_json']}")
    return 0
