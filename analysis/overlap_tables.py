"""Cross-metric overlap: for each model and ranking mode, every pair of metrics compared.

For each (model, mode) with at least two metrics, one representative job per metric
(:func:`analysis.lists.representatives`) contributes its ``topk/`` group. At each granularity
of esa.results.overlap (parameter, tensor, layer) the four pair statistics (Jaccard, overlap
coefficient, Spearman, Kendall over the union of the top-k sets, see esa.results.overlap) form a
square matrix. In addition, ``tensor_mean`` compares the per-tensor mean score of the FULL
tensors (``stats/mean`` of scores.h5) over the tensors both metrics score: Spearman and
Kendall tau-b of those means (:func:`stats_rank_correlation`).
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
from analysis.lists import load_ranked, representatives
from esa.results.records import ResultFileError
from esa.results.scorefile import read_stats
from esa.results.overlap import GRANULARITIES, overlap_stats

__all__ = ["PAIR_STATS", "OverlapGroup", "stats_rank_correlation", "cross_metric_overlap",
           "overlap_json", "overlap_heatmaps"]

PAIR_STATS = ("jaccard", "overlap_coefficient", "spearman", "kendall")


@dataclass
class OverlapGroup:
    """The cross-metric comparison of one model and ranking mode."""

    model: str
    mode: str
    metrics: list[str]
    jobs: list[dict[str, Any]]  # per metric: id, seed, topk, path
    pairs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by -> pair stats
    matrices: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)  # by -> stat -> matrix
    tensor_mean: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def stats_rank_correlation(a: dict[str, float], b: dict[str, float]
                           ) -> tuple[float | None, float | None, int]:
    """Spearman rho and Kendall tau-b of two keyed values over their COMMON keys.

    Keys whose value is not finite in either map are left out. Returns ``(rho, tau, n)``;
    rho and tau are None with fewer than two common keys or a constant side.
    """
    keys = sorted(k for k in a.keys() & b.keys()
                  if math.isfinite(a[k]) and math.isfinite(b[k]))
    va = np.array([a[k] for k in keys], dtype=np.float64)
    vb = np.array([b[k] for k in keys], dtype=np.float64)
    if len(keys) < 2 or np.all(va == va[0]) or np.all(vb == vb[0]):
        return None, None, len(keys)
    rho = float(stats.spearmanr(va, vb).statistic)
    tau = float(stats.kendalltau(va, vb, variant="b").statistic)
    return (rho if math.isfinite(rho) else None), (tau if math.isfinite(tau) else None), len(keys)


def _matrix(metrics: list[str], pairs: list[dict[str, Any]], stat: str) -> pd.DataFrame:
    mat = pd.DataFrame(np.nan, index=metrics, columns=metrics, dtype=float)
    for p in pairs:
        v = p[stat]
        mat.loc[p["a"], p["b"]] = mat.loc[p["b"], p["a"]] = np.nan if v is None else v
    return mat


def _group(model: str, mode: str, reps: pd.DataFrame) -> OverlapGroup:
    reps = reps.sort_values("metric")
    group = OverlapGroup(model=model, mode=mode, metrics=[], jobs=[])
    lists, stat_maps = [], {}
    for _, job in reps.iterrows():
        try:
            lists.append(load_ranked(job["dir"], str(job["metric"])))
        except ResultFileError as exc:  # a file that changed since it was collected
            group.skipped.append(f"{job['metric']} ({job['path']}): {exc}")
            continue
        group.metrics.append(str(job["metric"]))
        group.jobs.append({"metric": job["metric"], "id": job["id"], "seed": job["seed"],
                           "topk": job["topk"], "path": job["path"]})
        try:
            means = {s.name: s.mean for s in read_stats(Path(job["dir"]) / "scores.h5")}
        except ResultFileError:
            means = {}
        stat_maps[str(job["metric"])] = means
    for by in GRANULARITIES:
        pairs = [overlap_stats(lists[i], lists[j], by)
                 for i in range(len(lists)) for j in range(i + 1, len(lists))]
        group.pairs[by] = pairs
        # The diagonal (a list against itself) is computed too, not assumed to be 1: an
        # empty or constant list has undefined statistics.
        diag = [overlap_stats(x, x, by) for x in lists]
        group.matrices[by] = {s: _matrix(group.metrics, pairs + diag, s) for s in PAIR_STATS}
    names = group.metrics
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rho, tau, n = stats_rank_correlation(stat_maps[names[i]], stat_maps[names[j]])
            group.tensor_mean.append({"a": names[i], "b": names[j], "spearman": rho,
                                      "kendall": tau, "n_tensors": n})
    return group


def cross_metric_overlap(jobs: pd.DataFrame) -> list[OverlapGroup]:
    """One :class:`OverlapGroup` per (model, mode) that has at least two metrics."""
    p2 = complete_jobs(jobs, 2)
    reps = representatives(p2) if not p2.empty else p2
    groups = []
    if reps.empty:
        return groups
    for (model, mode), part in reps.groupby(["model", "mode"], sort=True, dropna=False):
        if part["metric"].nunique() >= 2:
            groups.append(_group(str(model), str(mode), part))
    return groups


def overlap_json(groups: list[OverlapGroup]) -> dict[str, Any]:
    """JSON-ready form of the groups (the content of overlap_report.json)."""
    out = []
    for g in groups:
        out.append({
            "model": g.model, "mode": g.mode, "metrics": g.metrics, "jobs": g.jobs,
            "by": {by: {"pairs": g.pairs[by],
                        "matrices": {s: g.matrices[by][s].to_numpy().tolist() for s in PAIR_STATS}}
                   for by in g.pairs},
            "tensor_mean": g.tensor_mean, "skipped": g.skipped,
        })
    return {"definitions": "see esa.results.overlap; matrices are ordered as 'metrics'; "
                           "tensor_mean correlates stats/mean of the full tensors",
            "groups": out}


def overlap_heatmaps(groups: list[OverlapGroup], plots_dir: Path) -> dict[tuple[str, str], Path]:
    """One heatmap PNG per group (rows: granularities, columns: statistics):
    (model, mode) -> path."""
    from analysis.plots import plot_heatmaps, slug

    return {(g.model, g.mode): plot_heatmaps(g.matrices, f"{g.model} · {g.mode} ranking: "
                                             f"overlap of the metrics' top-k",
                                             plots_dir / f"overlap_{slug(g.model, g.mode)}.png")
            for g in groups}
