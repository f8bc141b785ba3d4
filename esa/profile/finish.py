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
from esa.profile.ranking import rank_scores
from esa.profile.stats import compute_stats
from esa.results.exports import write_stats, write_topk_csv
from esa.results.scorefile import write_score_file
from esa.results.tables import TopK
from esa.spec.manifest import ProfileManifest

log = get_logger("profile")


def score_attrs(manifest: ProfileManifest, loaded_dtype: torch.dtype) -> dict[str, Any]:
    """The root attributes of scores.h5."""
    return {"metric": manifest.metric.name, "manifest_id": manifest.id, "manifest_json": manifest.to_dict(),
            "model_name": manifest.model.id, "model_revision": manifest.model.revision or "",
            "model_dtype": dtype_name(loaded_dtype), "esa_version": __version__,
            "mode": manifest.ranking.mode, "topk": manifest.ranking.topk}


def in_model_order(tensors: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """`tensors` re-keyed in the order of the model's parameters (names the model lacks last, by name)."""
    position = {name: i for i, name in enumerate(weights)}
    return dict(sorted(tensors.items(), key=lambda kv: (position.get(kv[0], len(position)), kv[0])))


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


def finish_scores(out: Path, manifest: ProfileManifest, model: Any, result: MetricResult,
                  loaded_dtype: torch.dtype, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank, compute stats, write scores.h5 and the exports the manifest asks for; returns a summary."""
    outputs = manifest.outputs
    weights = dict(model.named_parameters())
    # Rows (top-k ties, stats, datasets) follow the model's parameter order, whatever order the
    # sums arrived in (a resumed job reads them back from its checkpoint).
    result.scores = in_model_order(result.scores, weights)
    result.accumulators = {acc: in_model_order(t, weights) for acc, t in (result.accumulators or {}).items()}
    partial = result.extras.get("partial")  # hessian_diag --candidates: only these were computed
    topk = _rank(result.scores, partial, manifest, True, weights)
    bottomk = _rank(result.scores, partial, manifest, False, weights)
    stats = compute_stats(result.scores, manifest.ranking.topk)
    attrs = {**score_attrs(manifest, loaded_dtype), **(extra_attrs or {})}
    path = write_score_file(out / "scores.h5", scores=result.scores, topk=topk, bottomk=bottomk,
                            stats=stats, attrs=attrs, accumulators=result.accumulators or None,
                            counts=result.counts, unscored=result.unscored,
                            score_dtype=outputs.score_dtype, save=outputs.save_scores,
                            compression=outputs.compression)
    files: dict[str, Any] = {"scores": str(path)}
    if outputs.export_topk_csv:
        files["top_weights_csv"] = str(write_topk_csv(out / "top_weights.csv", topk))
    if outputs.export_stats:
        files["stats"] = [str(p) for p in write_stats(out, stats)]
    if outputs.save_plots:
        from esa.profile.plots import save_profile_plots

        files["plots"] = [str(p) for p in save_profile_plots(out / "plots", result.scores, topk, stats)]
    if "super_weights" in result.extras:
        atomic_write_json(out / "super_weights.json", result.extras["super_weights"])
        files["super_weights"] = str(out / "super_weights.json")
    top = topk.to_records()[: min(5, len(topk))]
    log.info("top weights: %s", ", ".join(f"{r['param']}:{','.join(map(str, r['index']))}" for r in top))
    return {"metric": manifest.metric.name, "mode": manifest.ranking.mode, "topk": manifest.ranking.topk,
            "n_ranked": len(topk), "files": files, "unscored": len(result.unscored), "top": top}
