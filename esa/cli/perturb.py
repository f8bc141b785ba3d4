"""`esa perturb`: phase 3 on explicit targets, a target list, or the top-k of a scores.h5."""

from __future__ import annotations

import argparse
import json

from esa.cli.options import (HELP_FORMATTER, add_data_flags, add_logging_flags, add_model_flags, build_manifest,
                             default_out_dir, given, positive_int)
from esa.cli.perturb_options import add_perturbation_flags, perturbation_sections, phase3_data
from esa.spec.manifest import MODES, Manifest


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("perturb", help="phase 3: perturb weights, ΔPPL against controls",
                       formatter_class=HELP_FORMATTER,
                       description="Phase 3: perturb the target weights in place, evaluate, restore them "
                       "bit-exactly, and compare with matched controls. Writes OUT/perturbation.json.")
    add_model_flags(p)
    add_data_flags(p, phase=3)
    add_perturbation_flags(p, required=True)
    t = p.add_argument_group("targets")
    t.add_argument("--target", action="append", default=None, metavar="PARAM:I,J",
                   help="a weight, e.g. model.embed_tokens.weight:128000,3303; repeatable")
    t.add_argument("--target-list", "--target_list", dest="target_list", default=None, metavar="CSV",
                   help="CSV with the columns of top_weights.csv, or param,index")
    t.add_argument("--from-scores", default=None, metavar="SCORES_H5", help="take the top-k of this ranking")
    t.add_argument("--topk", type=k_list, default=None, metavar="K[,K...]",
                   help="with --from-scores: how many (default: all ranked); several, e.g. 1,10,100,1000: a "
                        "dose-response sweep in one job, each k against its own matched controls")
    t.add_argument("--mode", default=None, choices=MODES, help="with --from-scores: the ranking mode it must hold")
    p.add_argument("--seed", type=int, default=None, help="seed of random perturbations and control draws")
    p.add_argument("--out-dir", default=None, help="output folder (default: outputs/<model name>/perturb_<name>)")
    p.add_argument("--save-plots", action="store_true", help="draw the target ΔPPL against the controls")
    p.add_argument("--experiment", default=None, help="experiment name recorded in the manifest")
    add_logging_flags(p)
    p.set_defaults(func=run)


def k_list(text: str) -> int | list[int]:
    """argparse type: '100' -> 100, '1,10,100' -> [1, 10, 100] (each k >= 1)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ks = [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"--topk takes k or k1,k2,...: {exc}") from None
    if not ks:
        raise argparse.ArgumentTypeError(f"--topk takes k or k1,k2,..., got '{text}'")
    return ks[0] if len(ks) == 1 else ks


def manifest_of(args: argparse.Namespace) -> Manifest:
    """The phase-3 manifest these flags describe."""
    from esa.core.errors import UserError

    if not (args.target or args.target_list or args.from_scores):
        raise UserError("no targets: give --target PARAM:I,J, --target-list CSV or --from-scores scores.h5")
    targets = given(weights=args.target, list=args.target_list, from_scores=args.from_scores, topk=args.topk,
                    mode=args.mode)
    out_dir = args.out_dir or default_out_dir(args, f"perturb_{args.perturb}")
    sections = perturbation_sections(args)
    return build_manifest(3, args, out_dir, data=phase3_data(args), targets=targets, **sections,
                          outputs={"save_plots": bool(args.save_plots)})


def run(args: argparse.Namespace) -> int:
    """Build the phase-3 manifest and run it."""
    from esa.runner import run as run_manifest

    summary = run_manifest(manifest_of(args))
    if not args.quiet:
        print(json.dumps({k: summary[k] for k in ("baseline_ppl", "perturbed_ppl", "delta_ppl", "delta_nll",
                                                  "controls", "by_k") if k in summary}, indent=2, default=str))
        print(f"wrote {summary['perturbation_json']}")
    return 0
