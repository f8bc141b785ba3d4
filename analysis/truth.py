"""Which metric predicts damage: every metric of a model against its ablation ground truth.

An ``ablation`` job (esa.perturb.ablation) measured the true ΔNLL of perturbing each of its
candidates alone. For every other metric with a complete full-data job on the same model (one job
per metric: full scores preferred, then the lowest seed, then the path), the metric's score of each
candidate is read from the metric's own scores.h5: its candidate scores when it scored a candidate set,
else its full score tensors when the job saved them, else its top-k list (a candidate outside the list
or the set has no score).
Over the candidates:

* **precision@k** = |top-k by the metric ∩ top-k by the true ΔNLL| / k, for k in K_VALUES below the
  number of candidates; both orders put higher first, ties (and unscored candidates, last) in
  candidate order;
* **spearman** / **kendall** (tau-b) between the metric's scores and the true ΔNLL; an unscored
  candidate gets a score below every scored one (tied with the other unscored ones), a ΔNLL of
  +inf (the model was destroyed) ranks above every finite one. Undefined (None) with fewer than
  two candidates or a constant side.

Results go to ``metric_vs_truth.csv`` (one row per model × ablation job × metric × k) and one log-log
scatter plot per ablation job (metric score against true ΔNLL; points with a score or ΔNLL ≤ 0 or
infinite cannot be drawn on log axes and are counted in the caption).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import complete_jobs
from analysis.lists import is_full_data
from esa.results.records import ResultFileError
from esa.results.scorefile import open_score_file
from esa.results.tables import CandidateScores

__all__ = ["TRUTH_METRIC", "K_VALUES", "TruthGroup", "precision_at_k", "rank_correlation", "scores_at",
           "truth_groups", "truth_table", "truth_plots"]

TRUTH_METRIC = "ablation"
K_VALUES = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class TruthGroup:
    """One ablation job and every metric of its model compared with it."""

    model: str
    truth: dict[str, Any]  # id, path, seed, perturbation
    names: list[str]  # the candidates, in candidate order
    delta_nll: np.ndarray
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> job, source, scores
    rows: list[dict[str, Any]] = field(default_factory=list)


def _order(values: np.ndarray) -> list[int]:
    """Indices by value, highest first; NaN (unscored) last; ties in candidate order."""
    key = np.where(np.isnan(values), -np.inf, values)
    return sorted(range(len(values)), key=lambda i: (-key[i], np.isnan(values[i]), i))


def precision_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """|top-k by scores ∩ top-k by truth| / k (see the module docstring for the orders)."""
    top_m = set(_order(np.asarray(scores, dtype=float))[:k])
    top_t = set(_order(np.asarray(truth, dtype=float))[:k])
    return len(top_m & top_t) / k


def _ranked_values(x: np.ndarray) -> np.ndarray:
    """Finite stand-ins with the same order: NaN below everything (tied), +inf above, -inf below finite."""
    x = np.asarray(x, dtype=float).copy()
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    x[np.isposinf(x)] = hi + 1.0 + abs(hi)
    x[np.isneginf(x)] = lo - 1.0 - abs(lo)
    x[np.isnan(x)] = lo - 2.0 - 2.0 * abs(lo)
    return x


def rank_correlation(scores: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    """Spearman rho and Kendall tau-b of scores against truth (None when undefined)."""
    a, b = _ranked_values(scores), _ranked_values(truth)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None, None
    rho = float(stats.spearmanr(a, b).statistic)
    tau = float(stats.kendalltau(a, b, variant="b").statistic)
    return (rho if math.isfinite(rho) else None), (tau if math.isfinite(tau) else None)


def scores_at(job_dir: str | Path, table: CandidateScores) -> tuple[np.ndarray, str]:
    """A metric job's score of each candidate of `table` (NaN where it has none) and where they came from."""
    with open_score_file(Path(job_dir) / "scores.h5") as sf:
        # A metric that scored candidates only (obd / hessian_diag on candidates) keeps zeros at the other
        # coordinates of its score tensors: its candidate rows are its scores.
        if sf.has_candidates():
            own = sf.candidates()
            lookup = dict(zip(own.names(), own.score))
            return np.array([lookup.get(n, np.nan) for n in table.names()], dtype=float), "candidate scores"
        if "scores" in sf.h5:
            out = np.full(len(table), np.nan)
            group = sf.h5["scores"]
            for i, (param, index) in enumerate(zip(table.param, table.index)):
                if param in group and len(index) == group[param].ndim:
                    out[i] = float(group[param][index])
            return out, "full scores"
        ranked = sf.topk()
        lookup = dict(zip(ranked.names(), ranked.score))
        return np.array([lookup.get(n, np.nan) for n in table.names()], dtype=float), f"top-{ranked.k} list"


def _metric_jobs(p2: pd.DataFrame, model: Any) -> dict[str, pd.Series]:
    """One full-data job per metric of a model (full scores first, then lowest seed, then path)."""
    own = p2[(p2["model"] == model) & (p2["metric"] != TRUTH_METRIC) & p2["shard"].map(is_full_data)]
    if own.empty:
        return {}
    ordered = own.assign(_full=~own["has_full_scores"].fillna(False).astype(bool),
                         _seed=pd.to_numeric(own["seed"], errors="coerce")).sort_values(["_full", "_seed", "path"])
    return {str(m): job for m, job in ordered.drop_duplicates("metric").set_index("metric", drop=False).iterrows()}


def truth_groups(jobs: pd.DataFrame) -> list[TruthGroup]:
    """One group per complete full-data ablation job, with every metric of its model compared."""
    p2 = complete_jobs(jobs, 2)
    if p2.empty:
        return []
    truths = p2[(p2["metric"] == TRUTH_METRIC) & p2["shard"].map(is_full_data)].sort_values("path")
    groups = []
    for _, tj in truths.iterrows():
        try:
            with open_score_file(Path(tj["dir"]) / "scores.h5") as sf:
                table = sf.candidates()
        except ResultFileError:
            continue
        pert = table.attrs.get("perturbation", "")
        g = TruthGroup(str(tj["model"]), {"id": tj["id"], "path": tj["path"], "seed": tj["seed"],
                                          "perturbation": pert}, table.names(), table.score)
        for metric, job in _metric_jobs(p2, tj["model"]).items():
            try:
                scores, source = scores_at(job["dir"], table)
            except ResultFileError:
                continue
            g.metrics[metric] = {"job": job, "source": source, "scores": scores}
            rho, tau = rank_correlation(scores, g.delta_nll)
            n = len(g.names)
            for k in [k for k in K_VALUES if k < n] or [n]:
                top_m = set(_order(scores)[:k])
                hits = len(top_m & set(_order(g.delta_nll)[:k]))
                g.rows.append({"model": g.model, "truth_id": tj["id"], "truth_path": tj["path"],
                               "truth_perturbation": pert, "n_candidates": n, "metric": metric,
                               "metric_id": job["id"], "metric_path": job["path"], "metric_seed": job["seed"],
                               "score_source": source, "n_scored": int(np.isfinite(scores).sum()), "k": k,
                               "hits": hits, "precision_at_k": hits / k, "spearman": rho, "kendall": tau})
        groups.append(g)
    return groups


def truth_table(groups: list[TruthGroup]) -> pd.DataFrame:
    """The content of metric_vs_truth.csv."""
    return pd.DataFrame([r for g in groups for r in g.rows])


def truth_plots(groups: list[TruthGroup], plots_dir: Path) -> list[tuple[Path, str]]:
    """One log-log scatter per ablation job: each metric's score against the true ΔNLL."""
    from analysis.plots import plot_truth_scatter, slug

    out = []
    for g in groups:
        if not g.metrics:
            continue
        series = {m: (v["scores"], g.delta_nll) for m, v in sorted(g.metrics.items())}
        path, hidden = plot_truth_scatter(series, f"metric score vs true ΔNLL: {g.model}",
                                          plots_dir / f"{slug('truth', g.model, g.truth['id'])}.png")
        note = "; ".join(f"{m}: {n}" for m, n in hidden.items() if n)
        out.append((path, f"Each candidate of ablation job {g.truth['id']} ({g.model}): the metric's score (x) "
                          f"against the true ΔNLL (y), log-log" + (f". Not drawable on log axes (≤ 0, "
                                                                    f"infinite or unscored): {note}" if note else "")))
    return out
