"""`esa profile`: phase 2 (score and rank every weight), optionally followed by phase 3.

The runbook's flags work as written: `--metric activation_magnitude`, `--seeds 0,1,2
--stability-check`, `--perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from esa.cli.options import (HELP_FORMATTER, add_data_flags, add_logging_flags, add_model_flags,
                             data_section, model_section, positive_int)
from esa.cli.perturb_options import add_perturbation_flags, wants_perturbation


def seed_list(text: str) -> list[int]:
    """argparse type: '0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got '{text}'")
    return seeds


# The registry's names, spelled out so that building the parser (esa --help, esa analyze) does
# not import torch; tests/test_cli.py checks this list against esa.metrics.metric_names().
METRIC_CHOICES = ("act_mag", "grad_squared", "grad_x_weight", "hessian_diag", "hutchinson_diag", "magnitude",
                  "super_weight", "activation_magnitude")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("profile", help="phase 2: score and rank every weight (scores.h5)",
                       formatter_class=HELP_FORMATTER,
                       description="Phase 2: score every weight with one metric, rank them per layer or "
                       "globally, and write OUT/scores.h5 (+ exports). With --perturb, phase 3 follows "
                       "on the top-k weights of each seed.")
    add_model_flags(p)
    add_data_flags(p, batch_size=1)
    g = p.add_argument_group("metric and ranking")
    g.add_argument("--metric", required=True, metavar="NAME",
                   help=f"one of {', '.join(METRIC_CHOICES)}")
    g.add_argument("--mode", default="per_layer", choices=["per_layer", "global"],
                   help="per_layer: top-k within each tensor; global: top-k over all tensors")
    g.add_argument("--topk", type=positive_int, default=100, help="k of the top-k (and bottom-k) lists")
    g.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="score/rank only parameters whose name matches (glob, or substring); repeatable")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="skip parameters whose name matches; repeatable")
    g.add_argument("--probes", type=positive_int, default=1, help="hutchinson_diag: Rademacher probes per batch")
    g.add_argument("--candidates", action="append", default=None, metavar="PARAM:I,J",
                   help="hessian_diag: score only these weights; repeatable")
    g.add_argument("--max-exact-coords", type=positive_int, default=4096,
                   help="hessian_diag: refuse more exact coordinates than this")
    g.add_argument("--pool-size", type=positive_int, default=None,
                   help="the seed draws --max-samples calibration windows from the first N (default: all)")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="score only slice I of N of the calibration windows (sum them with esa reduce)")
    g.add_argument("--seed", type=int, default=0, help="seed (calibration windows, probes)")
    g.add_argument("--seeds", type=seed_list, default=None, metavar="S1,S2,...",
                   help="run once per seed into OUT/seed_<s>/ (overrides --seed)")
    g.add_argument("--stability-check", action="store_true",
                   help="with several seeds: write OUT/stability_summary.json (top-k Jaccard, rank correlation)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out-dir", default=None,
                   help="output folder (default: outputs/<model name>/<metric>_<mode>_k<topk>)")
    o.add_argument("--save-scores", default="full", choices=["full", "topk"],
                   help="full: every score tensor in scores.h5; topk: only the ranked lists (huge models)")
    o.add_argument("--score-dtype", default="float32", choices=["float32", "float16"], help="dtype of stored scores")
    o.add_argument("--compression", default=None, choices=["lzf", "gzip"], help="HDF5 compression (off: fastest)")
    o.add_argument("--export-topk-csv", action="store_true", help="write OUT/top_weights.csv")
    o.add_argument("--export-stats", action="store_true", help="write per-tensor sensitivity_stats.{csv,json}")
    o.add_argument("--save-plots", action="store_true", help="write PNG plots into OUT/plots/")
    o.add_argument("--experiment", default=None, help="experiment name recorded in the manifest")
    add_perturbation_flags(p)
    add_logging_flags(p)
    p.set_defaults(func=run)


def build_manifest(args: argparse.Namespace, seed: int, out_dir: str) -> dict[str, Any]:
    """The phase-2 manifest these flags describe for one seed."""
    from esa.manifest import SCHEMA_VERSION

    data = {**data_section(args), "pool_size": args.pool_size}
    return {"schema_version": SCHEMA_VERSION, "phase": 2, "experiment": args.experiment or "adhoc",
            "model": model_section(args), "data": data, "seed": seed,
            "metric": {"name": args.metric, "probes": args.probes, "include": args.include or [],
                       "exclude": args.exclude or [], "candidates": args.candidates or [],
                       "max_exact_coords": args.max_exact_coords},
            "ranking": {"mode": args.mode, "topk": args.topk},
            "shard": args.shard or "0/1",
            "outputs": {"dir": out_dir, "save_scores": args.save_scores, "score_dtype": args.score_dtype,
                        "compression": args.compression, "export_topk_csv": args.export_topk_csv,
                        "export_stats": args.export_stats, "save_plots": args.save_plots}}


def run(args: argparse.Namespace) -> int:
    """Run phase 2 for each seed, then the stability summary and phase 3 when asked for."""
    from esa.calibration import parse_shard
    from esa.errors import UserError
    from esa.metrics import get_metric
    from esa.runner import run as run_manifest

    from esa.checkpoint import install_stop_signals

    install_stop_signals()  # the cluster's USR1/USR2 warning -> checkpoint at the next batch
    get_metric(args.metric)  # an unknown metric fails before any work
    parse_shard(args.shard)
    if wants_perturbation(args):  # and so do a bad perturbation or control, before hours of profiling
        from esa.cli.perturb_options import controls_section, perturbation_section

        perturbation_section(args)
        controls_section(args)
    seeds = args.seeds or [args.seed]
    if args.stability_check and len(seeds) < 2:
        raise UserError("--stability-check needs at least two --seeds (e.g. --seeds 0,1,2)")
    from esa.cli.options import default_out_dir

    out = Path(args.out_dir or default_out_dir(args, f"{args.metric}_{args.mode}_k{args.topk}"))
    folders: dict[int, Path] = {}
    for seed in seeds:
        folder = out if len(seeds) == 1 else out / f"seed_{seed}"
        summary = run_manifest(build_manifest(args, seed, str(folder)))
        folders[seed] = folder
        if not args.quiet:
            print(f"seed {seed}: {summary['files']['scores']}")
        if wants_perturbation(args):
            from esa.cli.perturb_options import phase3_manifest

            p3 = phase3_manifest(args, seed=seed, out_dir=str(folder / "perturb"),
                                 from_scores=str(folder / "scores.h5"))
            result = run_manifest(p3)
            if not args.quiet:
                print(f"seed {seed}: ΔPPL {result['delta_ppl']:+.4g} -> {folder / 'perturb' / 'perturbation.json'}")
    if args.stability_check:
        from esa.stability import write_seed_stability

        summary = write_seed_stability(folders, out / "stability_summary.json")
        if not args.quiet:
            print(json.dumps({k: summary[k] for k in ("num_seeds", "jaccard_mean", "jaccard_std")}))
    return 0
