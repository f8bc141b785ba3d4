"""The verdict: the runbook's "what to look for", evaluated per model × metric with the numbers behind it.

Each line is one check with its verdict and the numbers it rests on; every number is copied or
computed from a result file named in the line's ``source`` (delta_ppl.csv rows from perturbation.json,
stability_summary.json, overlap_report.json, metric_vs_truth.csv, the planted-weight ranks):

* **damage** (per model, metric, mode, perturbation, k; over the seeds of that condition): the targets'
  ΔPPL (mean over seeds) against the random_k draws: ``ratio`` = target ΔPPL / random_k mean ΔPPL
  (mean over seeds of each job's draw mean; infinite when that mean is ≤ 0 and the target > 0) and
  ``p`` = the largest of the seeds' one-sided empirical p-values. pass: ratio ≥ RATIO_MIN and
  p ≤ ALPHA; inconclusive: ratio ≥ RATIO_MIN and no draw reached the target, but R draws cannot give
  p ≤ ALPHA (the smallest p is 1/(R + 1)); fail otherwise. bottom_k is deterministic (one draw), so
  it is shown as a reference ratio (target ΔPPL / bottom_k ΔPPL), never as a p-value.
* **stability** (per model, metric, mode, k): the mean top-k Jaccard over all pairs of seeds
  (parameter granularity); pass: > JACCARD_MIN.
* **agreement** (per model, mode, pair of grad_x_weight / grad_squared / hutchinson_diag): their
  top-k Jaccard (parameter granularity) and Spearman; pass: Jaccard > JACCARD_MIN. With fewer than
  two of the three run: not measured.
* **ground truth** (per model, metric, when an ablation job exists): precision@k and Spearman with the
  true ΔNLL (metric_vs_truth.csv); informational (the runbook sets no threshold).
* **positive control** (per planted model, metric): the planted weights' ranks per seed; found when
  they are the top-ranked weights in every seed, missed when in none, mixed otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.overlap_tables import OverlapGroup
from analysis.stability import StabilityGroup

__all__ = ["RATIO_MIN", "ALPHA", "JACCARD_MIN", "AGREEMENT_METRICS", "VERDICT_COLUMNS", "damage_lines",
           "stability_lines", "agreement_lines", "truth_lines", "planted_lines", "verdict_table"]

RATIO_MIN = 10.0  # "ΔPPL of targets ≫ controls": at least ten times the random_k mean
ALPHA = 0.01
JACCARD_MIN = 0.3
AGREEMENT_METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag")
TRUTH_K = 10  # the k of the ground-truth line (smaller when there are fewer candidates)
VERDICT_COLUMNS = ["model", "metric", "check", "setting", "verdict", "numbers", "warning", "source"]


def _f(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _line(model: Any, metric: Any, check: str, setting: str, verdict: str, numbers: str, source: str,
          warning: str = "", **values: Any) -> dict[str, Any]:
    return {"model": model, "metric": metric, "check": check, "setting": setting, "verdict": verdict,
            "numbers": numbers, "warning": warning, "source": source, **values}


def damage_lines(delta: pd.DataFrame) -> list[dict[str, Any]]:
    """ΔPPL of the targets against random_k (and bottom_k as a reference) per condition."""
    out: list[dict[str, Any]] = []
    if delta.empty:
        return out
    keys = ["model", "metric", "mode", "perturbation", "k"]
    keyed = delta.assign(**{c: delta[c].astype(object).where(delta[c].notna(), "") for c in keys})
    for key, part in keyed.groupby(keys, sort=True):
        model, metric, mode, pert, k = key
        setting = f"{pert}, k = {k}" + (f", {mode}" if mode else "")
        targets = part["delta_ppl"].to_numpy(dtype=float)
        target = math.inf if np.isnan(targets).any() or np.isinf(targets).any() else float(targets.mean())
        ids = ", ".join(str(i) for i in part["id"])
        source = f"delta_ppl.csv (perturbation.json of {ids})"
        if "random_k_mean" not in part.columns or part["random_k_mean"].isna().all():
            out.append(_line(model, metric, "damage: targets ≫ random_k", setting, "not measured",
                             f"target ΔPPL {_fmt(target)}; no random_k control", source, target_delta_ppl=target,
                             n_seeds=len(part)))
            continue
        control = float(part["random_k_mean"].astype(float).mean())
        ratio = target / control if control > 0 else (math.inf if target > 0 else math.nan)
        p = float(part["random_k_p_value"].astype(float).max())
        draws = int(part["random_k_n"].astype(float).min())
        floor = 1.0 / (draws + 1)
        strong = math.isfinite(ratio) and ratio >= RATIO_MIN or (ratio == math.inf)
        if strong and p <= ALPHA:
            verdict = "pass"
        elif strong and p <= floor * (1 + 1e-9) and floor > ALPHA:
            verdict = "inconclusive"
        else:
            verdict = "fail"
        warning = (f"too few draws for p < {ALPHA:g}: R = {draws} gives at best p = 1/{draws + 1} = {floor:.3g}"
                   if floor > ALPHA else "")
        bottom = float(part["bottom_k_mean"].astype(float).mean()) if "bottom_k_mean" in part.columns else math.nan
        bottom_ratio = target / bottom if bottom > 0 else math.nan
        numbers = (f"target ΔPPL {_fmt(target)} vs random_k mean {_fmt(control)}: ratio {_fmt(ratio)}; "
                   f"p = {_fmt(p)} (R = {draws}, {len(part)} seed{'s' if len(part) > 1 else ''})")
        if not math.isnan(bottom):
            numbers += f"; bottom_k ΔPPL {_fmt(bottom)} (reference ratio {_fmt(bottom_ratio)})"
        out.append(_line(model, metric, "damage: targets ≫ random_k", setting, verdict, numbers, source, warning,
                         target_delta_ppl=target, control_mean=control, ratio=ratio, p_value=p, draws=draws,
                         p_floor=floor, bottom_k_delta_ppl=bottom, bottom_k_ratio=bottom_ratio,
                         n_seeds=len(part), k=k, perturbation=pert, mode=mode, job_ids=ids))
    return out


def stability_lines(groups: list[StabilityGroup]) -> list[dict[str, Any]]:
    """Top-k Jaccard across seeds per model × metric × mode × k."""
    out = []
    for g in groups:
        p = g.by["parameter"]
        j, sd = p.get("jaccard_mean"), p.get("jaccard_std")
        verdict = "not measured" if j is None else ("pass" if j > JACCARD_MIN else "fail")
        seeds = ", ".join(str(m["key"]) for m in g.members)
        out.append(_line(g.model, g.metric, f"stability: top-k Jaccard across seeds > {JACCARD_MIN:g}",
                         f"{g.mode}, k = {g.topk}, seeds {seeds}", verdict,
                         f"Jaccard {_fmt(_f(j))} ± {_fmt(_f(sd))} over {len(p.get('pairs', []))} pair(s); "
                         f"Spearman {_fmt(_f(p.get('spearman_mean')))}", "stability_summary.json (seeds)",
                         jaccard_mean=_f(j), jaccard_std=_f(sd), spearman_mean=_f(p.get("spearman_mean")),
                         n_seeds=len(g.members), mode=g.mode, k=g.topk))
    return out


def agreement_lines(groups: list[OverlapGroup]) -> list[dict[str, Any]]:
    """Agreement of grad×w, grad² and Hutchinson per model × mode (each pair run)."""
    out = []
    for g in groups:
        present = [m for m in AGREEMENT_METRICS if m in g.metrics]
        check = f"agreement: grad×w, grad², Hutchinson (Jaccard > {JACCARD_MIN:g})"
        if len(present) < 2:
            if present:
                out.append(_line(g.model, ", ".join(present), check, g.mode, "not measured",
                                 f"only {', '.join(present)} of {', '.join(AGREEMENT_METRICS)} was run",
                                 "overlap_report.json"))
            continue
        for pair in g.pairs["parameter"]:
            if pair["a"] in present and pair["b"] in present:
                j, rho = pair["jaccard"], pair["spearman"]
                out.append(_line(g.model, f"{pair['a']} vs {pair['b']}", check, g.mode,
                                 "not measured" if j is None else ("pass" if j > JACCARD_MIN else "fail"),
                                 f"Jaccard {_fmt(_f(j))}, Spearman {_fmt(_f(rho))} (top-k sets, parameter level)",
                                 "overlap_report.json", jaccard=_f(j), spearman=_f(rho), mode=g.mode))
    return out


def truth_lines(truth: pd.DataFrame) -> list[dict[str, Any]]:
    """Each metric's precision@k and Spearman against the ablation truth."""
    out: list[dict[str, Any]] = []
    if truth.empty:
        return out
    for (model, truth_id, metric), part in truth.groupby(["model", "truth_id", "metric"], sort=True):
        k = int(max(k for k in part["k"] if k <= TRUTH_K) if (part["k"] <= TRUTH_K).any() else part["k"].min())
        row = part[part["k"] == k].iloc[0]
        out.append(_line(model, metric, "ground truth: the metric's top-k are the most damaging",
                         f"{row['n_candidates']} candidates of ablation {truth_id}", "info",
                         f"precision@{k} {_fmt(_f(row['precision_at_k']))} ({int(row['hits'])} of {k}); "
                         f"Spearman {_fmt(_f(row['spearman']))}, Kendall {_fmt(_f(row['kendall']))} with the "
                         f"true ΔNLL ({row['score_source']}, {int(row['n_scored'])} scored)",
                         "metric_vs_truth.csv", k=k, precision_at_k=_f(row["precision_at_k"]),
                         spearman=_f(row["spearman"]), kendall=_f(row["kendall"]), truth_id=truth_id))
    return out


def planted_lines(planted: pd.DataFrame) -> list[dict[str, Any]]:
    """Whether each metric finds the planted weights, per planted model (all seeds)."""
    out: list[dict[str, Any]] = []
    if planted.empty:
        return out
    for (model, metric), part in planted.groupby(["model", "metric"], sort=True):
        found = part["found"].astype(bool)
        verdict = "found" if found.all() else ("missed" if not found.any() else "mixed")
        ranks = "; ".join(f"seed {s}: {r}" for s, r in zip(part["seed"], part["ranks"]))
        out.append(_line(model, metric, "positive control: the planted weights rank first", "planted: "
                         + part["planted"].iloc[0].replace(";", ", "), verdict, f"ranks {ranks}",
                         "planted.csv (scores.h5 of " + ", ".join(part["id"].astype(str)) + ")",
                         found_seeds=int(found.sum()), n_seeds=len(part)))
    return out


_CHECK_ORDER = ("positive control", "damage", "stability", "agreement", "ground truth")


def verdict_table(delta: pd.DataFrame, seeds: list[StabilityGroup], overlap: list[OverlapGroup],
                  truth: pd.DataFrame, planted: pd.DataFrame) -> pd.DataFrame:
    """Every verdict line (the content of verdict.csv), by model, then check, then metric."""
    lines = (planted_lines(planted) + damage_lines(delta) + stability_lines(seeds) + agreement_lines(overlap)
             + truth_lines(truth))
    if not lines:
        return pd.DataFrame(columns=VERDICT_COLUMNS)
    table = pd.DataFrame(lines)
    order = table["check"].map(lambda c: next(i for i, p in enumerate(_CHECK_ORDER) if c.startswith(p)))
    table = table.assign(_o=order, _m=table["model"].astype(str)).sort_values(["_m", "_o"], kind="stable")
    cols = VERDICT_COLUMNS + [c for c in table.columns if c not in VERDICT_COLUMNS and not c.startswith("_")]
    return table[cols].reset_index(drop=True)
