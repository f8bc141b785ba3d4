"""Which phase-2 jobs stand for a model × metric × mode, and their top-k as RankedLists."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from esa.results.overlap import RankedList, ranked_list_from_items
from esa.results.scorefile import read_topk

__all__ = ["is_full_data", "shard_of", "representatives", "load_ranked"]


def shard_of(shard: object) -> tuple[int, int] | None:
    """``'i/n'`` -> (i, n); None for a full run, a reduced run or an unreadable label."""
    text = str(shard or "0/1")
    if text.startswith("reduced:"):
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        return None
    return (i, n) if n > 1 else None


def is_full_data(shard: object) -> bool:
    """True for a job that scored the whole calibration set (unsharded, or reduced)."""
    return shard_of(shard) is None


def representatives(p2: pd.DataFrame) -> pd.DataFrame:
    """One complete full-data job per (model, mode, metric): the lowest seed, then path.

    Cross-metric comparisons use these, so a metric run with five seeds still counts once.
    """
    full = p2[p2["shard"].map(is_full_data)]
    if full.empty:
        return full
    ordered = full.assign(_seed=pd.to_numeric(full["seed"], errors="coerce")).sort_values(
        ["_seed", "path"], na_position="last")
    return ordered.drop_duplicates(["model", "mode", "metric"]).drop(columns="_seed")


def load_ranked(job_dir: str | Path, name: str, group: str = "topk") -> RankedList:
    """The job's ``topk/`` (or ``bottomk/``) group of scores.h5 as an esa.results.overlap RankedList."""
    table = read_topk(Path(job_dir) / "scores.h5", group)
    return ranked_list_from_items(name, table.items())
