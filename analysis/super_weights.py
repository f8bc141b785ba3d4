"""Super-weight candidates (``super_weights.json``) next to the gradient ranks of the same weights.

For each candidate of a complete ``super_weight`` job, the gradient metric's view of the same
coordinate in the same model (the representative grad_x_weight job, lowest seed):

* ``grad_rank_in_tensor``: its rank within its own tensor (1 = highest score), from a
  ``per_layer`` ``topk/`` group when the weight is in it, else computed from the full score
  tensor ``scores/<param>`` when the job saved it, as ``1 + #{scores > its score}`` (ties
  share the best rank);
* ``grad_rank_global``: its rank over all scored tensors, from a ``global`` ``topk/`` group;
* ``grad_score``: the gradient score of the weight when known.

When the weight is in no top-k and no full scores were saved, the rank is beyond the top-k
(``grad_rank_note`` says so).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.collect import complete_jobs
from analysis.lists import is_full_data
from esa.core.io import read_json
from esa.results.records import ResultFileError
from esa.results.scorefile import read_scores, read_topk

__all__ = ["GRADIENT_METRIC", "rank_in_tensor", "super_weight_table"]

GRADIENT_METRIC = "grad_x_weight"


def rank_in_tensor(scores: np.ndarray, index: tuple[int, ...]) -> tuple[int, float] | None:
    """``(1 + #{scores strictly greater than scores[index]}, that score)``; None when the
    index lies outside the tensor or its score is NaN."""
    if len(index) != scores.ndim or any(not 0 <= i < n for i, n in zip(index, scores.shape)):
        return None
    s = float(scores[index])
    if math.isnan(s):
        return None
    return 1 + int(np.count_nonzero(scores > s)), s


class _GradientView:
    """The gradient jobs of one model: top-k lookups (per mode) and full score tensors."""

    def __init__(self, grad_jobs: pd.DataFrame) -> None:
        self.lookup: dict[str, dict[tuple[str, tuple[int, ...]], tuple[int, float]]] = {}
        self.jobs: dict[str, str] = {}  # mode -> job id
        self.full_dirs: list[str] = []
        ordered = grad_jobs.assign(_s=pd.to_numeric(grad_jobs["seed"], errors="coerce")
                                   ).sort_values(["_s", "path"])
        for _, job in ordered.iterrows():
            if job["has_full_scores"]:
                self.full_dirs.append(job["dir"])
            mode = str(job["mode"])
            if mode in self.lookup:
                continue
            try:
                t = read_topk(Path(job["dir"]) / "scores.h5")
            except ResultFileError:
                continue
            self.lookup[mode] = {(p, ix): (int(r), float(s))
                                 for p, ix, r, s in zip(t.param, t.index, t.rank, t.score)}
            self.jobs[mode] = str(job["id"])

    def ranks(self, param: str, index: tuple[int, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"grad_rank_in_tensor": None, "grad_rank_global": None,
                               "grad_score": None, "grad_rank_note": ""}
        key = (param, index)
        notes = []
        if key in self.lookup.get("per_layer", {}):
            out["grad_rank_in_tensor"], out["grad_score"] = self.lookup["per_layer"][key]
            notes.append(f"in-tensor rank from per_layer top-k of {self.jobs['per_layer']}")
        if key in self.lookup.get("global", {}):
            out["grad_rank_global"], out["grad_score"] = self.lookup["global"][key]
            notes.append(f"global rank from global top-k of {self.jobs['global']}")
        if out["grad_rank_in_tensor"] is None:
            for d in self.full_dirs:
                try:
                    tensor = read_scores(Path(d) / "scores.h5", [param])[param]
                except ResultFileError:  # unreadable, or no full scores of this parameter
                    continue
                found = rank_in_tensor(tensor, index)
                if found is not None:
                    out["grad_rank_in_tensor"], out["grad_score"] = found
                    notes.append("in-tensor rank from the full scores")
                    break
        if out["grad_rank_in_tensor"] is None and out["grad_rank_global"] is None:
            ks = ", ".join(f"{m} top-k" for m in sorted(self.lookup)) or "no top-k"
            notes.append(f"not in {ks}; no full scores saved" if self.lookup
                         else f"no {GRADIENT_METRIC} job for this model")
        out["grad_rank_note"] = "; ".join(notes)
        return out


def super_weight_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per super-weight candidate with the gradient metric's ranks of that weight."""
    p2 = complete_jobs(jobs, 2)
    if p2.empty:
        return pd.DataFrame()
    sw_jobs = p2[p2["has_super_weights"].fillna(False).astype(bool)]
    grads = p2[(p2["metric"] == GRADIENT_METRIC) & p2["shard"].map(is_full_data)]
    views: dict[str, _GradientView] = {}
    rows = []
    for _, job in sw_jobs.sort_values("path").iterrows():
        try:
            cands = read_json(Path(job["dir"]) / "super_weights.json")
        except ResultFileError:
            continue
        model = str(job["model"])
        if model not in views:
            views[model] = _GradientView(grads[grads["model"] == job["model"]])
        for c in cands if isinstance(cands, list) else []:
            index = tuple(int(i) for i in c.get("index") or ())
            row = {"model": model, "sw_rank": c.get("rank"), "layer": c.get("layer"),
                   "param": c.get("param"), "expert": c.get("expert"), "row": c.get("row"),
                   "col": c.get("col"), "weight": c.get("weight"),
                   "input_spike": c.get("input_spike"), "output_spike": c.get("output_spike"),
                   "weight_value": c.get("weight_value")}
            row.update(views[model].ranks(str(c.get("param")), index))
            row.update(seed=job["seed"], id=job["id"], path=job["path"])
            rows.append(row)
    return pd.DataFrame(rows)
