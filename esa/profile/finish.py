"""From score tensors to files: rank, summarise, write scores.h5 and the exports.

Shared by the phase-2 runner and `esa reduce`, so a reduced run writes exactly what an unsharded
run writes. One tensor at a time: a sharded job gathers each score tensor (and the weight it
scores, for the ranked values) on rank 0, offers it to the rankers, the statistics, the plots'
sampler and the file, and drops it — no process ever holds the whole model's scores at once.
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
from esa.parallel.env import broadcast_object, is_rank0
from esa.parallel.fsdp import gather_to_rank0
from esa.profile.metrics import MetricResult
from esa.profile.plots import ScoreSampler
from esa.profile.ranking import Ranker, rank_candidates
from esa.profile.stats import tensor_stats
from esa.results.exports import write_candidates_csv, write_stats, write_topk_csv
from esa.results.scorefile import ScoreFileWriter
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


def in_model_order(tensors: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """`tensors` re-keyed in the order of the model's parameters (names the model lacks last, by name)."""
    position = {name: i for i, name in enumerate(weights)}
    return dict(sorted(tensors.items(), key=lambda kv: (position.get(kv[0], len(position)), kv[0])))


def _computed_only(scores: torch.Tensor, flat: list[int] | None, largest: bool) -> torch.Tensor:
    """Scores with the coordinates a metric did not compute pushed past every real score (a 0 there
    would look like the least sensitive weight); they are dropped from the ranking afterwards."""
    if flat is None:
        return scores
    masked = torch.full_like(scores, float("-inf") if largest else float("inf"))
    masked.view(-1)[list(flat)] = scores.view(-1)[list(flat)]
    return masked


def _finite_rows(ranked: TopK) -> TopK:
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


def _finish_sparse(out: Path, manifest: ProfileManifest, result: MetricResult, table: CandidateScores,
                   attrs: dict[str, Any], tensor_order: list[str]) -> dict[str, Any]:
    """A result of candidate scores only (ablation): ranked over its candidates, stored in scores.h5's
    candidates/ group (no scores/, no per-tensor stats), plus its CSV export."""
    ranking, outputs = manifest.ranking, manifest.outputs
    topk, bottomk = (rank_candidates(table, ranking.topk, ranking.mode, largest, list(ranking.include) or None,
                                     list(ranking.exclude) or None, tensor_order=tensor_order)
                     for largest in (True, False))
    with ScoreFileWriter(out / "scores.h5", attrs=attrs, score_dtype=outputs.score_dtype, save="candidates",
                         compression=outputs.compression) as writer:
        path = writer.finish(topk=topk, bottomk=bottomk, unscored=result.unscored, candidates=table)
    return _exports(out, manifest, result, topk, [], None, path, table)


def finish_scores(out: Path, manifest: ProfileManifest, model: Any, result: MetricResult,
                  loaded_dtype: torch.dtype | str, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank, compute stats, write scores.h5 and the exports the manifest asks for; returns a summary
    (the same on every rank of a sharded job; rank 0 writes the files).

    A sparse result (result.candidates without dense scores: ablation) is ranked over its candidates
    and stored in scores.h5's candidates/ group only (see _finish_sparse); `model` may then be None
    (esa reduce merges such shards without loading it). A metric that computed some coordinates only
    (hessian_diag / obd on candidates) also stores them as candidate rows."""
    attrs = {**score_attrs(manifest, loaded_dtype), **(extra_attrs or {})}
    params = dict(model.named_parameters()) if model is not None else {}
    if not result.scores:
        if result.candidates is None:
            raise ValueError("a metric result needs dense scores or candidate scores")
        summary = _finish_sparse(out, manifest, result, result.candidates, attrs, list(params)) if is_rank0() else None
        return broadcast_object(summary)
    outputs, ranking = manifest.outputs, manifest.ranking
    k, mode = ranking.topk, ranking.mode
    rankers = [Ranker(k, mode, largest, list(ranking.include) or None, list(ranking.exclude) or None)
               for largest in (True, False)]
    partial = result.extras.get("partial")  # hessian_diag / obd on candidates: only these were computed
    table = _partial_table(result.scores, partial, params) if partial else None
    stats, sampler = [], ScoreSampler() if outputs.save_plots else None
    writer = None
    if is_rank0():
        writer = ScoreFileWriter(out / "scores.h5", attrs=attrs, score_dtype=outputs.score_dtype,
                                 save=outputs.save_scores, compression=outputs.compression)
    # Parameter order, whatever order the metric's hooks filled its dict in (FSDP2's backward
    # reaches the root's lm_head first) or a resumed job read its sums back from the checkpoint:
    # rankings (ties), stats rows and the file's datasets come out the same way on every run.
    order = list(in_model_order(result.scores, params))
    with writer or _Nothing():
        for name in order:
            scores = gather_to_rank0(result.scores[name])
            weight = gather_to_rank0(params[name].detach()) if name in params else None
            if scores is None:
                continue  # not rank 0: its part has been sent
            flat = partial.get(name) if partial else None
            for ranker in rankers:
                ranker.add(name, _computed_only(scores, flat, ranker.largest), weight)
            stats.append(tensor_stats(name, scores, k))
            if sampler is not None:
                sampler.add(name, scores)
            writer.add_scores(name, scores)  # type: ignore[union-attr]
            del scores, weight
        for acc_name, tensors in (result.accumulators or {}).items():
            for name, tensor in in_model_order(tensors, params).items():
                full = gather_to_rank0(tensor)
                if full is not None:
                    writer.add_accumulator(acc_name, name, full)  # type: ignore[union-attr]
        summary = None
        if writer is not None:
            topk, bottomk = (r.result(weights_required=True) for r in rankers)
            if partial:
                topk, bottomk = _finite_rows(topk), _finite_rows(bottomk)
            path = writer.finish(topk=topk, bottomk=bottomk, stats=stats,
                                 counts=result.counts if result.accumulators else None, unscored=result.unscored,
                                 candidates=table)
            summary = _exports(out, manifest, result, topk, stats, sampler, path, table)
    return broadcast_object(summary)


class _Nothing:
    """A context manager that does nothing (ranks other than 0 write no file)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> None:
        return None


def _exports(out: Path, manifest: ProfileManifest, result: MetricResult, topk: TopK, stats: list,
             sampler: ScoreSampler | None, path: Path, table: CandidateScores | None = None) -> dict[str, Any]:
    outputs = manifest.outputs
    files: dict[str, Any] = {"scores": str(path)}
    if outputs.export_topk_csv:
        files["top_weights_csv"] = str(write_topk_csv(out / "top_weights.csv", topk))
    if outputs.export_stats and stats:
        files["stats"] = [str(p) for p in write_stats(out, stats)]
    if table is not None and table.csv_name:
        files[table.csv_name.replace(".", "_")] = str(write_candidates_csv(out / table.csv_name, table))
    if sampler is not None:
        from esa.profile.plots import save_profile_plots

        files["plots"] = [str(p) for p in save_profile_plots(out / "plots", sampler, topk, stats)]
    if "super_weights" in result.extras:
        atomic_write_json(out / "super_weights.json", result.extras["super_weights"])
        files["super_weights"] = str(out / "super_weights.json")
    top = topk.to_records()[: min(5, len(topk))]
    log.info("top weights: %s", ", ".join(f"{r['param']}:{','.join(map(str, r['index']))}" for r in top))
    return {"metric": manifest.metric.name, "mode": manifest.ranking.mode, "topk": manifest.ranking.topk,
            "n_ranked": len(topk), "files": files, "unscored": len(result.unscored), "top": top}
