"""Perturbation flags shared by `esa perturb` and `esa profile --perturb`, and the sections they give."""

from __future__ import annotations

import argparse
from typing import Any

from esa.cli.options import default, given, positive_int
from esa.spec.manifest import ControlsSpec
from esa.spec.names import CONTROLS, PERTURBATIONS


def add_perturbation_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--perturb/--perturbation and its parameters, --controls, --control-repeats, --baseline-eval."""
    g = p.add_argument_group("perturbation (phase 3)")
    g.add_argument("--perturb", "--perturbation", dest="perturb", required=required, default=None, metavar="NAME",
                   help=", ".join(e.name + (f" (alias {', '.join(e.aliases)})" if e.aliases else "")
                                  for e in PERTURBATIONS))
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
                   help=f"comma-separated controls: {', '.join(CONTROLS.names())}")
    g.add_argument("--control-repeats", type=positive_int, default=None,
                   help="draws of each random control; bottom_k is drawn once" + default(ControlsSpec, "repeats"))
    g.add_argument("--baseline-eval", default=None, metavar="EVAL_JSON",
                   help="reuse this phase-1 eval.json when it matches the model and data")
    g.add_argument("--perturb-seq-len", type=positive_int, default=None,
                   help="evaluation windows' length for phase 3 (default: --seq-len)")
    g.add_argument("--perturb-max-samples", type=positive_int, default=None,
                   help="evaluation windows for phase 3 (default: --max-samples)")


def wants_perturbation(args: argparse.Namespace) -> bool:
    """Whether phase 3 was asked for."""
    return bool(getattr(args, "perturb", None))


def perturbation_sections(args: argparse.Namespace) -> dict[str, Any]:
    """The phase-3 sections these flags give (perturbation, controls, baseline); checked at once."""
    from esa.spec.params import params_from_options

    params = params_from_options(args.perturb, perturb_scale=args.perturb_scale, scale=args.scale,
                                 noise_sigma=args.noise_sigma, noise_mode=args.noise_mode, bits=args.bits,
                                 bit_index=args.bit_index, prob=args.perturb_prob)
    return {"perturbation": {"name": params.kind, "params": params.to_dict()},
            "controls": given(names=CONTROLS.parse_list(args.controls) if args.controls else None,
                              repeats=args.control_repeats),
            "baseline": given(eval_json=args.baseline_eval)}


def phase3_data(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation data of phase 3: the data flags, with --perturb-seq-len / --perturb-max-samples."""
    from esa.cli.options import data_section

    return {**data_section(args), **given(seq_len=getattr(args, "perturb_seq_len", None),
                                          max_samples=getattr(args, "perturb_max_samples", None))}
