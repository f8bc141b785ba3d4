"""Stability of the top-k sets across seeds and across data shards.

Seeds: complete full-data phase-2 jobs grouped by (model, metric, mode, topk); a group with
at least two distinct seeds gets :func:`esa.results.overlap.stability_summary` at each granularity
(all pairs of seeds; Jaccard mean and population std over the pairs; mean Spearman and
Kendall). When one seed was run twice, the first job by path counts.

Shards: jobs of one (model, metric, mode, topk, seed) that each scored a slice ``i/n`` of
the calibration set (``--shard``), compared the same way with the shard labels as keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.collect import complete_jobs
from analysis.lists import is_full_data, load_ranked, shard_of
from esa.results.records import ResultFileError
from esa.results.overlap import GRANULARITIES, RankedList, stability_summary

__all__ = ["StabilityGroup", "seed_stability", "shard_stability", "stability_table",
           "stability_pairs_table", "stability_json"]


@dataclass
class StabilityGroup:
    """The agreement of several runs of one model × metric × mode (× seed for shards)."""

    kind: str  # "seeds" or "shards"
    model: str
    metric: str
    mode: str
    topk: Any
    seed: Any  # the seed shared by the shards; None for a seed group
    members: list[dict[str, Any]]  # key (seed or shard label), id, path
    by: dict[str, dict[str, Any]] = field(default_factory=dict)  # granularity -> summary
    skipped: list[str] = field(default_factory=list)


def _summarise(group: StabilityGroup, rows: list[tuple[Any, pd.Series]]) -> StabilityGroup | None:
    lists: dict[Any, RankedList] = {}
    for key, job in rows:
        try:
            lists[key] = load_ranked(job["dir"], f"{group.kind[:-1]} {key}")
        except ResultFileError as exc:
            group.skipped.append(f"{job['path']}: {exc}")
            continue
        group.members.append({"key": key, "id": job["id"], "path": job["path"]})
    if len(lists) < 2:
        return None
    group.by = {by: stability_summary(lists, by) for by in GRANULARITIES}
    return group


def _seed_key(seed: Any) -> Any:
    try:
        return int(seed)
    except (TypeError, ValueError):
        return str(seed)


def seed_stability(jobs: pd.DataFrame) -> list[StabilityGroup]:
    """One group per (model, metric, mode, topk) with at least two seeds."""
    p2 = complete_jobs(jobs, 2)
    if p2.empty:
        return []
    p2 = p2[p2["shard"].map(is_full_data)].sort_values("path")
    out = []
    for (model, metric, mode, topk), part in p2.groupby(["model", "metric", "mode", "topk"],
                                                       sort=True, dropna=False):
        by_seed: dict[Any, pd.Series] = {}
        for _, job in part.iterrows():
            by_seed.setdefault(_seed_key(job["seed"]), job)  # first job by path wins
        if len(by_seed) < 2:
            continue
        rows = sorted(by_seed.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
        g = _summarise(StabilityGroup("seeds", str(model), str(metric), str(mode), topk, None, []),
                       rows)
        if g is not None:
            out.append(g)
    return out


def shard_stability(jobs: pd.DataFrame) -> list[StabilityGroup]:
    """One group per (model, metric, mode, topk, seed) with at least two data shards."""
    p2 = complete_jobs(jobs, 2)
    if p2.empty:
        return []
    sharded = p2[p2["shard"].map(lambda s: shard_of(s) is not None)].sort_values("path")
    out = []
    for (model, metric, mode, topk, seed), part in sharded.groupby(
            ["model", "metric", "mode", "topk", "seed"], sort=True, dropna=False):
        by_shard: dict[str, pd.Series] = {}
        for _, job in part.iterrows():
            by_shard.setdefault(str(job["shard"]), job)
        if len(by_shard) < 2:
            continue
        rows = sorted(by_shard.items(), key=lambda kv: shard_of(kv[0]) or (0, 0))
        g = _summarise(StabilityGroup("shards", str(model), str(metric), str(mode), topk, seed, []),
                       rows)
        if g is not None:
            out.append(g)
    return out


def stability_table(groups: list[StabilityGroup]) -> pd.DataFrame:
    """One row per group: Jaccard mean ± std at each granularity, mean rank correlations
    (parameter granularity), and the number of runs compared."""
    rows = []
    for g in groups:
        p = g.by["parameter"]
        row = {"kind": g.kind, "model": g.model, "metric": g.metric, "mode": g.mode,
               "topk": g.topk, "seed": g.seed, "runs": len(g.members),
               "keys": ", ".join(str(m["key"]) for m in g.members)}
        for by in GRANULARITIES:
            row[f"jaccard_mean_{by}"] = g.by[by]["jaccard_mean"]
            row[f"jaccard_std_{by}"] = g.by[by]["jaccard_std"]
        row["spearman_mean"] = p["spearman_mean"]
        row["kendall_mean"] = p["kendall_mean"]
        rows.append(row)
    return pd.DataFrame(rows)


def stability_pairs_table(groups: list[StabilityGroup], by: str = "parameter") -> pd.DataFrame:
    """Every compared pair of runs at granularity ``by``."""
    rows = []
    for g in groups:
        for pair in g.by[by]["pairs"]:
            rows.append({"kind": g.kind, "model": g.model, "metric": g.metric, "mode": g.mode,
                         "topk": g.topk, "a": pair["seed_a"], "b": pair["seed_b"],
                         "jaccard": pair["jaccard"],
                         "overlap_coefficient": pair["overlap_coefficient"],
                         "spearman": pair["spearman"], "kendall": pair["kendall"],
                         "n_intersection": pair["n_intersection"], "n_union": pair["n_union"]})
    return pd.DataFrame(rows)


def stability_json(seed_groups: list[StabilityGroup], shard_groups: list[StabilityGroup]
                   ) -> dict[str, Any]:
    """JSON-ready content of stability_summary.json."""
    def one(g: StabilityGroup) -> dict[str, Any]:
        return {"model": g.model, "metric": g.metric, "mode": g.mode, "topk": g.topk,
                "seed": g.seed, "members": g.members, "by": g.by, "skipped": g.skipped}
    return {"definitions": "esa.results.overlap.stability_summary over all pairs; jaccard_std is the "
                           "population std (ddof=0)",
            "seeds": [one(g) for g in seed_groups], "shards": [one(g) for g in shard_groups]}
