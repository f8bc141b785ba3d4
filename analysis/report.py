"""``build_report(RUN)``: collect the jobs, compute every table, write RUN/report/.

Outputs (all written atomically): ``report.md``, ``report.html`` (self-contained; the verdict
first), ``jobs.csv``, ``verdict.csv``, ``overlap_report.json``, ``stability_summary.json``,
``delta_ppl.csv``, ``metric_vs_truth.csv``, ``planted.csv``, ``baselines.csv``, ``super_weights.csv``
and ``plots/*.png``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collect import JOB_COLUMNS, collect_jobs, problem_jobs
from analysis.delta_ppl import baseline_table, condition_summary, delta_plots, delta_table
from analysis.overlap_tables import (PAIR_STATS, OverlapGroup, cross_metric_overlap,
                                     overlap_heatmaps, overlap_json)
from analysis.planted import planted_table
from analysis.render import Block, Heading, Image, Para, Table, render_html, render_markdown
from analysis.stability import (seed_stability, shard_stability, stability_json,
                                stability_pairs_table, stability_table)
from analysis.super_weights import super_weight_table
from analysis.truth import truth_groups, truth_plots, truth_table
from analysis.verdict import ALPHA, JACCARD_MIN, RATIO_MIN, VERDICT_COLUMNS, verdict_table
from esa.core.io import atomic_write_json, atomic_write_text
from esa.results.overlap import GRANULARITIES
from esa.results.state import DONE, STATES

__all__ = ["build_report", "write_report", "status_counts", "summary_line", "REPORT_DIR"]

REPORT_DIR = "report"
_PROBLEM_COLUMNS = ["status", "reason", "id", "phase", "model", "metric", "seed", "perturbation",
                    "k", "path"]
_JOB_DISPLAY = ["id", "phase", "model", "metric", "mode", "topk", "seed", "shard",
                "perturbation", "k", "status", "ppl", "delta_ppl", "path"]


def _plain(obj: Any) -> Any:
    """pandas' NA and numpy scalars as plain JSON values (esa.core.io.jsonable does the rest)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is pd.NA:
        return None
    return obj


def _status_counts(jobs: pd.DataFrame) -> pd.DataFrame:
    if jobs.empty:
        return pd.DataFrame()
    counts = (jobs.assign(phase=jobs["phase"].astype(object).where(jobs["phase"].notna(), "?"))
              .groupby(["phase", "status"]).size().unstack(fill_value=0))
    counts = counts.reindex(columns=[s for s in STATES if s in counts.columns])
    counts["total"] = counts.sum(axis=1)
    return counts.reset_index()


def _overlap_blocks(groups: list[OverlapGroup], heatmaps: dict[tuple[str, str], Path]
                    ) -> list[Block]:
    blocks: list[Block] = [Heading("Phase 2: cross-metric overlap"), Para(
        "Top-k sets of different metrics on the same model and ranking mode (one job per "
        "metric: full data, lowest seed). Spearman and Kendall are computed over the union of "
        "the two top-k sets, an absent key ranking last; at tensor and layer granularity each "
        "key's score is the sum of its weights' scores in the list. 'tensor mean' correlates "
        "the per-tensor mean score of the full tensors (stats/) over the tensors both score.")]
    if not groups:
        blocks.append(Para("No model and mode has two or more metrics with complete jobs."))
    for g in groups:
        blocks.append(Heading(f"{g.model} · {g.mode}", 3))
        blocks.append(Table(pd.DataFrame(g.jobs)))
        rows = [{"by": by, **{k: p[k] for k in ("a", "b", *PAIR_STATS, "n_a", "n_b",
                                                  "n_intersection", "n_union")}}
                for by in GRANULARITIES for p in g.pairs[by]]
        blocks.append(Table(pd.DataFrame(rows)))
        if (g.model, g.mode) in heatmaps:
            blocks.append(Image(heatmaps[(g.model, g.mode)],
                                f"Overlap of the metrics' top-k on {g.model} ({g.mode}) at each "
                                f"granularity"))
        blocks.append(Para("Tensor-mean rank correlation:"))
        blocks.append(Table(pd.DataFrame(g.tensor_mean)))
        if g.skipped:
            blocks.append(Para("Skipped: " + "; ".join(g.skipped)))
    return blocks


def _stability_blocks(seeds: list[Any], shards: list[Any]) -> list[Block]:
    blocks: list[Block] = [Heading("Phase 2: stability across seeds and data shards"), Para(
        "Jaccard over all pairs of runs (mean ± population std) at each granularity; mean "
        "Spearman and Kendall of the scores over the union of the two top-k sets (parameter "
        "granularity).")]
    blocks += [Heading("Across seeds", 3),
               Table(stability_table(seeds), empty_text="no model × metric × mode has two seeds")]
    if seeds:
        blocks += [Para("Each pair of seeds (parameter granularity):"),
                   Table(stability_pairs_table(seeds))]
    blocks += [Heading("Across data shards", 3),
               Table(stability_table(shards), empty_text="no sharded jobs")]
    if shards:
        blocks.append(Table(stability_pairs_table(shards)))
    return blocks


def _delta_columns(table: pd.DataFrame, controls: list[str]) -> list[str]:
    cols = ["model", "metric", "mode", "perturbation", "k", "n_targets", "seed", "baseline_ppl",
            "perturbed_ppl", "delta_ppl", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high",
            "delta_token_accuracy"]
    for c in controls:
        cols += [f"{c}_n", f"{c}_mean", f"{c}_q05", f"{c}_q95", f"{c}_p_value", f"{c}_z"]
    return [c for c in cols if c in table.columns]


def _verdict_blocks(verdict: pd.DataFrame) -> list[Block]:
    warnings = sorted({w for w in verdict.get("warning", pd.Series(dtype=object)).dropna() if w})
    blocks: list[Block] = [Heading("Verdict: what the runbook looks for"), Para(
        f"Each line checks one of the runbook's signals on one model and metric, with the numbers it rests on "
        f"(all in verdict.csv, each traceable to the file named in `source`). damage: the targets' ΔPPL at "
        f"least {RATIO_MIN:g}× the random_k mean and p ≤ {ALPHA:g} (pass); that ratio with p at the smallest "
        f"value the draws allow but above {ALPHA:g} is inconclusive; bottom_k is one deterministic draw, so "
        f"it is a reference ratio, not a p-value. stability: top-k Jaccard across seeds > {JACCARD_MIN:g}. "
        f"agreement: Jaccard of grad×w, grad² and Hutchinson > {JACCARD_MIN:g}. ground truth: how well the "
        "metric's ranking predicts the exactly measured damage (ablation). positive control: the weights "
        "planted in a model must rank first.")]
    blocks.append(Table(verdict, VERDICT_COLUMNS[:-2] + ["source"], empty_text="nothing to judge yet"))
    for w in warnings:
        blocks.append(Para(f"Warning: {w}."))
    return blocks


def _truth_blocks(truth: pd.DataFrame, plots: list[tuple[Path, str]]) -> list[Block]:
    blocks: list[Block] = [Heading("Ground truth: which metric predicts damage"), Para(
        "Each ablation job measured the exact change of the mean NLL of its calibration windows when each "
        "candidate weight alone is perturbed. For every other metric on the same model: precision@k = |the "
        "metric's top-k ∩ the k most damaging| / k over the same candidates, and Spearman / Kendall of its "
        "scores with the true ΔNLL (metric_vs_truth.csv; definitions in analysis/truth.py).")]
    if not truth.empty:
        cols = ["model", "metric", "k", "precision_at_k", "hits", "spearman", "kendall", "n_candidates",
                "n_scored", "score_source", "truth_id", "metric_id"]
        blocks.append(Table(truth, cols))
    else:
        blocks.append(Para("No complete ablation job (esa profile --metric ablation --candidates-from ...)."))
    blocks += [Image(p, cap) for p, cap in plots]
    return blocks


def _planted_blocks(planted: pd.DataFrame) -> list[Block]:
    if planted.empty:
        return []
    return [Heading("Positive control: planted weights"), Para(
        "Models built with a known super weight (esa:tiny-<arch>-planted: a cancelling pair that wrecks the "
        "model when either weight is zeroed) list the planted weights. Each phase-2 job's rank of them over "
        "everything it ranked (1 = highest); found = they are its top-ranked weights."),
        Table(planted, ["model", "metric", "seed", "ranks", "found", "scores", "rank_source", "id"])]


def _blocks(run: Path, jobs: pd.DataFrame, parts: dict[str, Any]) -> list[Block]:
    problems = problem_jobs(jobs)
    n_ok = int((jobs["status"] == DONE).sum()) if not jobs.empty else 0
    blocks: list[Block] = [
        Heading(f"ESA report: {run.name}", 1),
        Para(f"Run folder {run} · generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} · "
             f"{len(jobs)} jobs, {n_ok} done, {len(problems)} not done."),
        *_verdict_blocks(parts["verdict"]),
        Heading("Job status"), Table(_status_counts(jobs), empty_text="no jobs found"),
        Heading("Missing, failed, incomplete and corrupt jobs"),
        Table(problems, _PROBLEM_COLUMNS, empty_text="none: every job is complete"),
        Heading("Phase 1: baselines"),
        Para("Sanity flags mark results that must not be reported as they are (a PPL near 1 "
             "means broken data: padding counted or repeated windows)."),
        Table(parts["baselines"], empty_text="no complete phase-1 jobs"),
    ]
    blocks += _overlap_blocks(parts["overlap"], parts["heatmaps"])
    blocks += _stability_blocks(parts["seeds"], parts["shards"])
    delta = parts["delta"]
    blocks += [Heading("Phase 3: ΔPPL against controls"), Para(
        "Δ = perturbed − baseline. The CI is the job's paired per-window bootstrap CI of ΔNLL; "
        "p-values are the job's one-sided empirical p = (1 + #{control Δ ≥ target Δ}) / (R + 1) "
        "and z = (target − control mean) / control std. Control columns summarise each "
        "control's ΔPPL draws (q05/q95: 5 % and 95 % quantiles). Every number is also in "
        "delta_ppl.csv at full precision."),
        Heading("Per condition (mean over seeds)", 3),
        Table(parts["conditions"], empty_text="no complete phase-3 jobs"),
        Heading("Per job", 3),
        Table(delta.table, _delta_columns(delta.table, delta.controls),
              empty_text="no complete phase-3 jobs")]
    blocks += [Image(p, cap) for p, cap in parts["delta_plots"]]
    blocks += _truth_blocks(parts["truth"], parts["truth_plots"])
    blocks += _planted_blocks(parts["planted"])
    blocks += [Heading("Super-weight candidates and their gradient ranks"), Para(
        "Candidates of the super_weight detector (rank 0 = largest output spike) with the rank "
        "of the same weight under grad_x_weight on the same model: within its tensor and over "
        "all tensors (1 = most sensitive)."),
        Table(parts["super_weights"], empty_text="no super_weight jobs")]
    blocks += [Heading("All jobs"), Table(jobs, _JOB_DISPLAY, empty_text="no jobs found")]
    return blocks


def status_counts(jobs: pd.DataFrame) -> dict[str, int]:
    """Jobs per state (every state of esa.results.state.STATES, zeros included), in that order."""
    found = jobs["status"].value_counts().to_dict() if not jobs.empty else {}
    return {state: int(found.get(state, 0)) for state in STATES}


def summary_line(counts: dict[str, int]) -> str:
    """``12 jobs: 9 done, 1 failed, 1 corrupt, 1 missing`` (states other than done only when present,
    failed / corrupt / missing always)."""
    shown = [s for s in STATES if counts.get(s) or s in (DONE, "failed", "corrupt", "missing")]
    return f"{sum(counts.values())} jobs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in shown)


def build_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
                 ) -> Path:
    """Aggregate every job under ``run_dir`` and write the report; returns report.html's path.

    ``out_dir`` defaults to RUN/report. Raises esa.core.errors.UserError when RUN is not a folder.
    """
    return write_report(run_dir, out_dir)[0]


def write_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
                 ) -> tuple[Path, dict[str, int]]:
    """:func:`build_report`, also returning the jobs per state (:func:`status_counts`)."""
    t0 = time.perf_counter()
    jobs = collect_jobs(run_dir)
    run = Path(run_dir).resolve()
    report = Path(out_dir).resolve() if out_dir else run / REPORT_DIR
    plots = report / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for old in plots.glob("*.png"):  # plots of an earlier report may no longer apply
        old.unlink()
    groups = cross_metric_overlap(jobs)
    seeds, shards = seed_stability(jobs), shard_stability(jobs)
    delta = delta_table(jobs)
    truths = truth_groups(jobs)
    parts = {"baselines": baseline_table(jobs), "overlap": groups,
             "heatmaps": overlap_heatmaps(groups, plots), "seeds": seeds, "shards": shards,
             "delta": delta, "conditions": condition_summary(delta.table),
             "delta_plots": delta_plots(delta, plots), "super_weights": super_weight_table(jobs),
             "truth": truth_table(truths), "truth_plots": truth_plots(truths, plots), "planted": planted_table(jobs)}
    parts["verdict"] = verdict_table(delta.table, seeds, groups, parts["truth"], parts["planted"])
    public = [c for c in JOB_COLUMNS if c in jobs.columns]
    atomic_write_text(report / "jobs.csv", jobs[public].to_csv(index=False) if not jobs.empty else "")
    atomic_write_json(report / "overlap_report.json", _plain(overlap_json(groups)))
    atomic_write_json(report / "stability_summary.json", _plain(stability_json(seeds, shards)))
    atomic_write_text(report / "delta_ppl.csv", delta.table.to_csv(index=False))
    atomic_write_text(report / "baselines.csv", parts["baselines"].to_csv(index=False))
    atomic_write_text(report / "super_weights.csv", parts["super_weights"].to_csv(index=False))
    atomic_write_text(report / "metric_vs_truth.csv", parts["truth"].to_csv(index=False))
    atomic_write_text(report / "planted.csv", parts["planted"].to_csv(index=False))
    atomic_write_text(report / "verdict.csv", parts["verdict"].to_csv(index=False))
    blocks = _blocks(run, jobs, parts)
    blocks.append(Para(f"Built in {time.perf_counter() - t0:.1f} s by `python -m analysis`."))
    atomic_write_text(report / "report.md", render_markdown(blocks, report))
    html = atomic_write_text(report / "report.html", render_html(blocks, f"ESA report: {run.name}"))
    return html, status_counts(jobs)
