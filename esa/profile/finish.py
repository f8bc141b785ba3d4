"""From score tensors to files: rank, summarise, write scores.h5 and the exports.

Shared by the phase-2 runner and `esa reduce`, so a reduced run writes exactly what an
unsharded run writes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esa import __version__
from esa.core.io import atomic_write_json
from esa.core.logs import get_logger
from esa.model.loading import dtype_name
from esa.profile.metrics import MetricResult
from esa.profile.ranking import rank_candidates, rank_scores
from esa.profile.stats import compute_stats
from esa.results.exports import write_candidates_csv, write_stats, write_topk_csv
from esa.results.scorefile import write_score_file
from esa.results.tables import CandidateScores, TopK
from esa.spec.manifest import ProfileManifest

log = get_logger("profile")


def score_attrs(manifest: ProfileManifest, loaded_dtype: torch.dtype | str) -> dict[str, Any]:
    """The root attributes of scores.h5."""
    dtype = loaded_dtype if isinstance(loaded_dtype, str) else dtype_name(loaded_dtype)
    return {"metric": manifest.metric.name, "manifest_id": manifest.id, "manifest_json": manifest.to_dict(),
            "model_name": manifest.model.id, "model_revision": manifest.model.revision or "",
            "model_dtype": dtype, "esa_version": __version__,
            "mode": manifest.ranking.mode, "topk": manifest.ranking.topk}


def _rank(scores: dict[str, torch.Tensor], partial: dict[str, list[int]] | None, manifest: ProfileManifest,
          largest: bool, weights: dict[str, Any]) -> TopK:
    """rank_scores, restricted to the computed coordinates when a metric scored only some."""
    ranking = manifest.ranking
    args = dict(k=ranking.topk, mode=ranking.mode, largest=largest, include=list(ranking.include) or None,
                exclude=list(ranking.exclude) or None, weights=weights)
    if not partial:
        return rank_scores(scores, **args)
    # Uncomputed coordinates hold 0 in the score tensors; they must never be ranked (a 0 would
    # look like the least sensitive weight). Push them past every real score, then drop them.
    fill = float("-inf") if largest else float("inf")
    masked = {}
    for name, flat in partial.items():
        t = torch.full_like(scores[name], fill)
        t.view(-1)[list(flat)] = scores[name].view(-1)[list(flat)]
        masked[name] = t
    ranked = rank_scores(masked, **args)
    keep = [i for i, sc in enumerate(ranked.score) if math.isfinite(sc)]
    return replace(ranked, param=[ranked.param[i] for i in keep], flat_index=ranked.flat_index[keep],
                   index=[ranked.index[i] for i in keep], score=ranked.score[keep], rank=ranked.rank[keep],
                   value=ranked.value[keep])


def _partial_table(scores: dict[str, torch.Tensor], partial: dict[str, list[int]],
                   weights: dict[str, Any]) -> CandidateScores:
    """The computed coordinates of a partial metric (hessian_diag / obd on candidates) as sparse scores."""
    param, flat, index, score, value = [], [], [], [], []
    for name, coords in partial.items():
        t = scores[name].reshape(-1)
        w = weights[name].detach().reshape(-1) if name in weights else None
        for i in coords:
            param.append(name)
            flat.append(int(i))
            index.append(tuple(int(v) for v in torch.unravel_index(torch.tensor(int(i)), scores[name].shape)))
            score.append(float(t[int(i)]))
            value.append(float(w[int(i)]) if w is not None else math.nan)
    return CandidateScores(param, flat, index, score, value, list(range(len(param))))


def _rank_sparse(table: CandidateScores, manifest: ProfileManifest, largest: bool, weights: dict[str, Any]) -> TopK:
    ranking = manifest.ranking
    return rank_candidates(table, ranking.topk, ranking.mode, largest, list(ranking.include) or None,
                           list(ranking.exclude) or None, tensor_order=list(weights))


def finish_scores(out: Path, manifest: ProfileManifest, model: Any, result: MetricResult,
                  loaded_dtype: torch.dtype | str, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank, compute stats, write scores.h5 and the exports the manifest asks for; returns a summary.

    A sparse result (result.candidates without dense scores: ablation) is ranked over its candidates,
    stored in scores.h5's candidates/ group only, has no per-tensor stats, and writes its CSV export
    (ablation.csv); `model` may then be None (esa reduce merges such shards without loading it)."""
    outputs = manifest.outputs
    weights = dict(model.named_parameters()) if model is not None else {}
    partial = result.extras.get("partial")  # hessian_diag / obd on candidates: only these were computed
    table = result.candidates
    if table is None and partial:
        table = _partial_table(result.scores, partial, weights)
    if result.scores:
        topk = _rank(result.scores, partial, manifest, True, weights)
        bottomk = _rank(result.scores, partial, manifest, False, weights)
        stats = compute_stats(result.scores, manifest.ranking.topk)
        save = outputs.save_scores
    else:
        if table is None:
            raise ValueError("a metric result needs dense scores or candidate scores")
        topk = _rank_sparse(table, manifest, True, weights)
        bottomk = _rank_sparse(table, manifest, False, weights)
        stats, save = None, "candidates"
    attrs = {**score_attrs(manifest, loaded_dtype), **(extra_attrs or {})}
    path = write_score_file(out / "scores.h5", scores=result.scores or None, topk=topk, bottomk=bottomk,
                            stats=stats, attrs=attrs, accumulators=result.accumulators or None,
                            counts=result.counts, unscored=result.unscored,
                            score_dtype=outputs.score_dtype, save=save,
                            compression=outputs.compression, candidates=table)
    files: dict[str, Any] = {"scores": str(path)}
    if outputs.export_topk_csv:
        files["top_weights_csv"] = str(write_topk_csv(out / "top_weights.csv", topk))
    if outputs.export_stats and stats is not None:
        files["stats"] = [str(p) for p in write_stats(out, stats)]
    if table is not None and table.csv_name:
        files[table.csv_name.replace(".", "_")] = str(write_candidates_csv(out / table.csv_name, table))
    if outputs.save_plots and result.scores:
        from esa.profile.plots import save_profile_plots

        files["plots"] = [str(p) for p in save_profile_plots(out / "plots", result.scores, topk, stats)]
    if "super_weights" in result.extras:
        atomic_write_json(out / "super_weights.json", result.extras["super_weights"])
        files["super_weights"] = str(out / "super_weights.json")
    top = topk.to_records()[: min(5, len(topk))]
    log.info("top weights: %s", ", ".join(f"{r['param']}:{','.join(map(str, r['index']))}" for r in top))
    return {"metric": manifest.metric.name, "mode": manifest.ranking.mode, "topk": manifest.ranking.topk,
            "n_ranked": len(topk), "files": files, "unscored": len(result.unscored), "top": top}
