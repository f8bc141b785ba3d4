"""Perturbation flags shared by `esa perturb` and `esa profile --perturb`, and the phase-3 manifest."""

from __future__ import annotations

import argparse
from typing import Any

from esa.cli.options import data_section, model_section, positive_int


def add_perturbation_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--perturb/--perturbation and its parameters, --controls, --control-repeats, --baseline-eval."""
    g = p.add_argument_group("perturbation (phase 3)")
    g.add_argument("--perturb", "--perturbation", dest="perturb", required=required, default=None, metavar="NAME",
                   help="zero, sign_flip, scale, gauss_noise (alias gaussian, noise), bit_flip (alias bitflip)")
    g.add_argument("--perturb-scale", type=float, default=None,
                   help="s of sign_flip (w->-s*w, default 1) and scale (w->s*w, default 1.2); sigma of gauss_noise")
    g.add_argument("--scale", type=float, default=None, help="same as --perturb-scale for scale/sign_flip")
    g.add_argument("--noise-sigma", "--noise_sigma", dest="noise_sigma", type=float, default=None,
                   help="gauss_noise sigma (default 0.05)")
    g.add_argument("--noise-mode", default=None, choices=["relative", "absolute"],
                   help="gauss_noise: w+sigma*|w|*eps (relative, default) or w+sigma*eps")
    g.add_argument("--bits", type=positive_int, default=None, help="bit_flip: random bits flipped per target (default 1)")
    g.add_argument("--bit-index", type=int, default=None, help="bit_flip: flip this bit (0 = least significant)")
    g.add_argument("--perturb-prob", type=float, default=None,
                   help="bit_flip: fraction of the targets hit (default 1)")
    g.add_argument("--controls", default="", metavar="LIST",
                   help="comma-separated controls: random_k, bottom_k, magnitude_matched")
    g.add_argument("--control-repeats", type=positive_int, default=None,
                   help="draws of each random control (default 20; bottom_k is drawn once)")
    g.add_argument("--baseline-eval", default=None, metavar="EVAL_JSON",
                   help="reuse this phase-1 eval.json when it matches the model and data")
    g.add_argument("--perturb-seq-len", type=positive_int, default=None,
                   help="evaluation windows' length for phase 3 (default: --seq-len)")
    g.add_argument("--perturb-max-samples", type=positive_int, default=None,
                   help="evaluation windows for phase 3 (default: --max-samples)")


def wants_perturbation(args: argparse.Namespace) -> bool:
    """Whether phase 3 was asked for."""
    return bool(getattr(args, "perturb", None))


def perturbation_section(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's perturbation section; validated (unknown names fail here)."""
    from esa.perturbations import perturbation_from_options

    pert = perturbation_from_options(args.perturb, perturb_scale=args.perturb_scale, scale=args.scale,
                                     noise_sigma=args.noise_sigma, noise_mode=args.noise_mode,
                                     bits=args.bits, bit_index=args.bit_index, prob=args.perturb_prob)
    return pert.describe()


def controls_section(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's controls section."""
    from esa.controls import parse_control_names

    names = parse_control_names(args.controls) if args.controls else []
    return {"names": names, "repeats": args.control_repeats or 20}


def phase3_manifest(args: argparse.Namespace, *, seed: int, out_dir: str, targets: list[str] | None = None,
                    target_list: str | None = None, from_scores: str | None = None) -> dict[str, Any]:
    """The phase-3 manifest of these flags (targets explicit, from a CSV, or the top-k of scores.h5)."""
    from esa.manifest import SCHEMA_VERSION

    data = data_section(args)
    if getattr(args, "perturb_seq_len", None):
        data["seq_len"] = args.perturb_seq_len
    if getattr(args, "perturb_max_samples", None):
        data["max_samples"] = args.perturb_max_samples
    return {"schema_version": SCHEMA_VERSION, "phase": 3, "experiment": args.experiment or "adhoc",
            "model": model_section(args), "data": data, "seed": seed,
            "perturbation": perturbation_section(args),
            "targets": {"weights": targets or [], "list": target_list, "from_scores": from_scores,
                        "topk": getattr(args, "topk", None), "mode": getattr(args, "mode", None)},
            "controls": controls_section(args),
            "baseline": {"eval_json": args.baseline_eval},
            "outputs": {"dir": out_dir, "save_plots": bool(getattr(args, "save_plots", False))}}
