"""`esa profile`: phase 2 (score and rank every weight), optionally followed by phase 3.

The runbook's flags work as written: `--metric activation_magnitude`, `--seeds 0,1,2
--stability-check`, `--perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k`.
Several seeds (and the phase-3 jobs after them) are an in-memory plan that the job layer's
in-process executor runs, one job after another, like any other plan.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esa.cli.options import (HELP_FORMATTER, add_data_flags, add_logging_flags, add_model_flags, build_manifest,
                             data_section, default, given, positive_int)
from esa.cli.perturb_options import add_perturbation_flags, perturbation_sections, phase3_data, wants_perturbation
from esa.spec.manifest import MODES, MetricSpec, Outputs, RankingSpec
from esa.spec.names import METRICS, PERTURBATIONS


def seed_list(text: str) -> list[int]:
    """argparse type: '0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got '{text}'")
    return seeds


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("profile", help="phase 2: score and rank every weight (scores.h5)",
                       formatter_class=HELP_FORMATTER,
                       description="Phase 2: score every weight with one metric, rank them per layer or "
                       "globally, and write OUT/scores.h5 (+ exports). With --perturb, phase 3 follows "
                       "on the top-k weights of each seed.")
    add_model_flags(p)
    add_data_flags(p, phase=2)
    g = p.add_argument_group("metric and ranking")
    g.add_argument("--metric", required=True, metavar="NAME",
                   help=f"one of {', '.join(METRICS.names(with_aliases=True))}")
    g.add_argument("--mode", default=None, choices=MODES, help="per_layer: top-k within each tensor; global: "
                   "top-k over all tensors" + default(RankingSpec, "mode"))
    g.add_argument("--topk", type=positive_int, default=None,
                   help="k of the top-k (and bottom-k) lists" + default(RankingSpec, "topk"))
    g.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="score/rank only parameters whose name matches (glob, or substring); repeatable")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="skip parameters whose name matches; repeatable")
    g.add_argument("--probes", type=positive_int, default=None,
                   help="hutchinson_diag: Rademacher probes per batch" + default(MetricSpec, "probes"))
    g.add_argument("--candidates", action="append", default=None, metavar="N|PARAM:I,J",
                   help="hessian_diag, obd, ablation: N = the first N weights of each --candidates-from file, or "
                        "a weight PARAM:I,J to score; repeatable")
    g.add_argument("--candidates-from", action="append", default=None, metavar="FILE",
                   help="hessian_diag, obd, ablation: take candidates from a scores.h5 (its top-k, best first), "
                        "a super_weights.json (by rank) or a targets CSV (file order); repeatable (union)")
    g.add_argument("--max-exact-coords", type=positive_int, default=None,
                   help="hessian_diag, obd: refuse more exact coordinates than this" + default(MetricSpec, "max_exact_coords"))
    g.add_argument("--per-sample", action="store_true", default=None,
                   help="fisher_obd: squared gradients of each window's loss instead of each batch's")
    g.add_argument("--ablate", default=None, metavar="NAME",
                   help="ablation: the perturbation applied to each candidate (default: zero); any of "
                        + ", ".join(PERTURBATIONS.names()))
    g.add_argument("--ablate-param", action="append", default=None, metavar="KEY=VALUE",
                   help="ablation: a parameter of --ablate, e.g. scale=-1 or sigma=0.1; repeatable")
    g.add_argument("--pool-size", type=positive_int, default=None,
                   help="the seed draws --max-samples calibration windows from the first N (default: all); "
                        "seeds then share the pool, not the windows")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="score only slice I of N of the calibration windows (sum them with esa reduce); "
                        "ablation: slice I of N of its candidates (esa reduce merges them)")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="first-order gradient metrics: recompute each decoder block's activations in backward "
                        "(less memory, same scores)")
    g.add_argument("--seed", type=int, default=None, help="seed (calibration windows, probes) (default: 0)")
    g.add_argument("--seeds", type=seed_list, default=None, metavar="S1,S2,...",
                   help="run once per seed into OUT/seed_<s>/ (overrides --seed)")
    g.add_argument("--stability-check", action="store_true",
                   help="with several seeds: write OUT/stability_summary.json (top-k Jaccard, rank correlation)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out-dir", default=None,
                   help="output folder (default: outputs/<model name>/<metric>_<mode>_k<topk>)")
    o.add_argument("--save-scores", default=None, choices=["full", "topk"],
                   help="full: every score tensor in scores.h5; topk: only the ranked lists (huge models)"
                   + default(Outputs, "save_scores"))
    o.add_argument("--score-dtype", default=None, choices=["float32", "float16"],
                   help="dtype of stored scores" + default(Outputs, "score_dtype"))
    o.add_argument("--compression", default=None, choices=["lzf", "gzip"], help="HDF5 compression (off: fastest)")
    o.add_argument("--export-topk-csv", action=argparse.BooleanOptionalAction, default=None,
                   help="write OUT/top_weights.csv" + default(Outputs, "export_topk_csv"))
    o.add_argument("--export-stats", action=argparse.BooleanOptionalAction, default=None,
                   help="write per-tensor sensitivity_stats.{csv,json}" + default(Outputs, "export_stats"))
    o.add_argument("--save-plots", action="store_true", default=None, help="write PNG plots into OUT/plots/")
    o.add_argument("--experiment", default=None, help="experiment name recorded in the manifest")
    o.add_argument("--dry-run", action="store_true",
                   help="run nothing: print each job's id and folder and the planner's memory and time estimate "
                        "(for this launch's ranks; with --gpu-memory, whether it fits)")
    o.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="with --dry-run: the GPU size to check the plan against, e.g. 80G")
    add_perturbation_flags(p)
    add_logging_flags(p)
    p.set_defaults(func=run)


def candidate_flags(values: list[str] | None) -> dict[str, object]:
    """--candidates values -> {candidates: [PARAM:I,J...], n_candidates: N} (only what was given)."""
    from esa.core.errors import UserError

    weights, counts = [], []
    for v in values or []:
        (counts if v.strip().isdigit() else weights).append(v.strip())
    if len(counts) > 1:
        raise UserError(f"--candidates N was given {len(counts)} times ({', '.join(counts)}); give one N")
    if counts and int(counts[0]) < 1:
        raise UserError("--candidates N needs N >= 1")
    return given(candidates=weights or None, n_candidates=int(counts[0]) if counts else None)


def ablate_section(name: str | None, params: list[str] | None) -> dict[str, object] | None:
    """--ablate NAME --ablate-param KEY=VALUE... -> the metric's perturbation section (None: not given)."""
    from esa.core.errors import UserError

    if name is None and not params:
        return None
    values: dict[str, object] = {}
    for item in params or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--ablate-param takes KEY=VALUE, got '{item}'")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return {"name": name or "zero", "params": values}


def manifest_of(args: argparse.Namespace, seed: int, out_dir: str):  # type: ignore[no-untyped-def]
    """The phase-2 manifest these flags describe for one seed."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    return build_manifest(
        2, args, out_dir, data={**data_section(args), **given(pool_size=args.pool_size)},
        metric={"name": args.metric, **given(probes=args.probes, include=args.include, exclude=args.exclude,
                                             max_exact_coords=args.max_exact_coords,
                                             candidates_from=args.candidates_from, per_sample=args.per_sample,
                                             perturbation=ablate_section(args.ablate, args.ablate_param)),
                **candidate_flags(args.candidates)},
        ranking=given(mode=args.mode, topk=args.topk), **given(shard=args.shard),
        parallel=given(activation_checkpointing=args.activation_checkpointing),
        outputs=given(save_scores=args.save_scores, score_dtype=args.score_dtype, compression=args.compression,
                      export_topk_csv=args.export_topk_csv, export_stats=args.export_stats,
                      save_plots=args.save_plots))


def phase3_manifest_of(args: argparse.Namespace, profile, out_dir: str):  # type: ignore[no-untyped-def]
    """The phase-3 manifest on the top-k of a phase-2 manifest's scores.h5."""
    p3 = argparse.Namespace(**{**vars(args), "seed": profile.seed})
    targets = {"from_scores": str(Path(profile.outputs.dir) / "scores.h5"), "topk": profile.ranking.topk,
               "mode": profile.ranking.mode}
    return build_manifest(3, p3, out_dir, data=phase3_data(args), targets=targets, **perturbation_sections(args),
                          outputs={"save_plots": bool(args.save_plots)})


def run(args: argparse.Namespace) -> int:
    """Run phase 2 for each seed (and phase 3 after each when asked), then the stability summary."""
    from esa.cli.options import default_out_dir
    from esa.core.errors import UserError
    from esa.spec.plan import Job
    from jobs.executors import run_in_process

    seeds = args.seeds or [args.seed if args.seed is not None else 0]
    if args.stability_check and len(seeds) < 2:
        raise UserError("--stability-check needs at least two --seeds (e.g. --seeds 0,1,2)")
    first = manifest_of(args, seeds[0], ".")  # every flag is checked before any work
    if wants_perturbation(args):  # and so are a bad perturbation or control, before hours of profiling
        perturbation_sections(args)
    out = Path(args.out_dir or default_out_dir(args, f"{first.metric.name}_{first.ranking.mode}_k{first.ranking.topk}"))
    folders = {seed: out if len(seeds) == 1 else out / f"seed_{seed}" for seed in seeds}
    jobs: list[Job] = []
    for seed, folder in folders.items():
        profile = manifest_of(args, seed, str(folder)).with_id()
        jobs.append(Job(profile, {"seed": seed, "metric": profile.metric.name}))
        if wants_perturbation(args):
            perturb = phase3_manifest_of(args, profile, str(folder / "perturb")).with_id()
            jobs.append(Job(perturb, {"seed": seed, "perturbation": perturb.perturbation.name}, needs=(profile.id,)))
    if args.dry_run:
        return _dry_run(jobs, args.gpu_memory)
    outcomes = run_in_process(jobs, folder=out / ".submitit", echo=False)
    for outcome in outcomes:
        if outcome.exception is not None:
            raise outcome.exception  # the CLI turns it into one line (and exit 2, or 75 when pre-empted)
        if not args.quiet:
            m = outcome.job.manifest
            where = Path(m.outputs.dir)
            print(f"seed {m.seed}: " + (f"ΔPPL {json.loads((where / 'perturbation.json').read_text())['delta_ppl']:+.4g} "
                                        f"-> {where / 'perturbation.json'}" if m.PHASE == 3 else f"{where / 'scores.h5'}"))
    if args.stability_check:
        from esa.results.stability import write_seed_stability

        summary = write_seed_stability(folders, out / "stability_summary.json")
        if not args.quiet:
            print(json.dumps({k: summary[k] for k in ("num_seeds", "jaccard_mean", "jaccard_std")}))
    return 0


def _dry_run(jobs: list, gpu_memory: str | None) -> int:
    """Print what would run and what the planner expects of it (torch is not needed)."""
    import dataclasses

    from esa.core.errors import UserError
    from esa.parallel.launch import detect_env
    from esa.planner.manifests import plan_manifest
    from esa.planner.render import format_plan

    env = detect_env()  # under torchrun the plan is for this launch's ranks
    for job in jobs:
        m = job.manifest
        m = dataclasses.replace(m, parallel=dataclasses.replace(m.parallel, nodes=1, gpus_per_node=env.world_size))
        print(f"job {m.id} (phase {m.PHASE}) -> {m.outputs.dir}")
        try:
            print(format_plan(plan_manifest(m, gpu_memory=gpu_memory), f"this launch: {env.world_size} rank(s)"))
        except UserError as exc:
            print(f"planner: n/a ({exc})")
    return 0
