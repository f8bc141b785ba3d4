"""The positive control: where each metric ranks the weights a planted model was built around.

A model made with a known super weight (``esa:tiny-<arch>-planted``, esa.model.planting) names its
planted weights in ``esa_planted.json``; every job records them with its model (``planted`` in the
``model`` section of eval.json and perturbation.json). For every complete full-data phase-2 job of
such a model, each planted weight's rank over everything the job ranked (1 = highest score):

* from the job's ``topk/`` group when it is a global ranking that holds the weight;
* else, for a job that scored a candidate set (ablation; obd or hessian_diag on candidates), from its
  candidate scores: 1 + #{candidate scores > its score};
* else from its full score tensors: 1 + #{scores > the weight's score} over all scored tensors, plus the
  equal scores esa ranks first (earlier tensors, lower flat index);
* else unknown (beyond the ranked top-k, no full scores saved).

A job *finds* the planted weights when each of them ranks within the first n (n = how many were
planted), i.e. they are the top n weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.collect import complete_jobs
from analysis.lists import is_full_data
from esa.results.records import ResultFileError
from esa.results.scorefile import open_score_file
from esa.spec.weights import parse_weight

__all__ = ["planted_models", "planted_rank", "planted_table"]


def planted_models(jobs: pd.DataFrame) -> dict[str, list[str]]:
    """model -> its planted weights, from any job that recorded them."""
    out: dict[str, list[str]] = {}
    if jobs.empty or "planted" not in jobs.columns:
        return out
    for _, job in jobs[jobs["planted"].notna()].iterrows():
        out.setdefault(str(job["model"]), str(job["planted"]).split(";"))
    return out


def planted_rank(job_dir: str | Path, name: str) -> tuple[int | None, float | None, str]:
    """(rank over everything the job ranked, the weight's score, where the rank came from)."""
    param, index = parse_weight(name)
    with open_score_file(Path(job_dir) / "scores.h5") as sf:
        ranking = sf.topk()
        ranked = ranking.names() if ranking.mode == "global" else []
        if name in ranked:
            row = ranked.index(name)
            return int(ranking.rank[row]), float(ranking.score[row]), "global top-k"
        if "scores" in sf.h5 and param in sf.h5["scores"] and not sf.has_candidates():
            group = sf.h5["scores"]
            score = float(group[param][index])
            if math.isnan(score):
                return None, None, "score is NaN"
            # esa's tie rule: equal scores rank by tensor position, then flat index.
            above, before = 0, True
            flat = int(np.ravel_multi_index(index, group[param].shape))
            for p in group:
                t = group[p][()].reshape(-1)
                above += int(np.count_nonzero(t > score))
                if p == param:
                    above += int(np.count_nonzero(t[:flat] == score))
                    before = False
                elif before:
                    above += int(np.count_nonzero(t == score))
            return 1 + above, score, "full scores"
        if sf.has_candidates():
            cands = sf.candidates()
            names = cands.names()
            if name in names:
                score = float(cands.score[names.index(name)])
                return 1 + int(np.count_nonzero(cands.score > score)), score, "among the candidates"
            return None, None, "not a candidate"
        return None, None, f"beyond the top-{ranking.k}; no full scores saved"


def planted_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per planted model × full-data phase-2 job: each planted weight's rank, and found or missed."""
    planted = planted_models(jobs)
    p2 = complete_jobs(jobs, 2)
    rows: list[dict[str, Any]] = []
    if not planted or p2.empty:
        return pd.DataFrame()
    full = p2[p2["shard"].map(is_full_data)]
    for model, names in sorted(planted.items()):
        own = full[full["model"] == model].assign(_s=pd.to_numeric(full["seed"], errors="coerce"))
        for _, job in own.sort_values(["metric", "_s", "path"]).iterrows():
            ranks, scores, sources = [], [], []
            try:
                for name in names:
                    r, s, src = planted_rank(job["dir"], name)
                    ranks.append(r)
                    scores.append(s)
                    sources.append(src)
            except ResultFileError:
                continue
            found = all(r is not None and r <= len(names) for r in ranks)
            rows.append({"model": model, "metric": job["metric"], "seed": job["seed"], "mode": job["mode"],
                         "planted": ";".join(names), "ranks": ";".join("—" if r is None else str(r) for r in ranks),
                         "best_rank": min((r for r in ranks if r is not None), default=None),
                         "worst_rank": None if any(r is None for r in ranks) else max(ranks),
                         "found": found, "rank_source": "; ".join(dict.fromkeys(sources)),
                         "scores": ";".join("—" if s is None else repr(s) for s in scores),
                         "id": job["id"], "path": job["path"]})
    return pd.DataFrame(rows)
