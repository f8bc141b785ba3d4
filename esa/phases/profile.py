"""Phase 2: score every weight with one metric, rank, and write scores.h5 plus exports."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esa import __version__, checkpoint
from esa.calibration import batches, parse_shard, select_windows, shard_batches, shard_slice
from esa.data import load_windows
from esa.errors import UserError
from esa.exports import write_stats, write_topk_csv
from esa.io import atomic_write_json
from esa.logs import get_logger, progress
from esa.manifest import data_spec, model_spec
from esa.metrics import MetricOptions, MetricResult, canonical_name, get_metric
from esa.models import dtype_name, load_model, max_positions
from esa.phases.common import seed_everything
from esa.ranking import rank_scores
from esa.runner import register_phase
from esa.scorefile import write_score_file
from esa.tensor_stats import compute_stats

log = get_logger("profile")

DEFAULT_RANKING = {"mode": "per_layer", "topk": 100}
DEFAULT_OUTPUTS = {"save_scores": "full", "score_dtype": "float32", "compression": None,
                   "export_topk_csv": True, "export_stats": True, "save_plots": False}


def _metric_options(section: dict[str, Any], seed: int, shard: tuple[int, int]) -> MetricOptions:
    # Probes are seeded per global calibration batch (seed, batch index), so shards and resumed
    # jobs draw what the unsharded run draws.
    gen = torch.Generator().manual_seed(int(seed))
    return MetricOptions(probes=int(section.get("probes", 1)), include=section.get("include") or None,
                         seed=int(seed),
                         exclude=section.get("exclude") or None,
                         max_exact_coords=int(section.get("max_exact_coords", 4096)),
                         candidates=section.get("candidates") or None, generator=gen,
                         keep_accumulators=shard[1] > 1)


def _use_eager_attention(model: Any) -> None:
    """Second-order metrics need double backward, which fused SDPA/flash kernels lack."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "eager":
        log.info("switching attention from %s to eager (double backward needs it)", current)
        model.set_attn_implementation("eager")


def score_attrs(manifest: dict[str, Any], metric: str, loaded_dtype: torch.dtype) -> dict[str, Any]:
    """The root attributes of scores.h5."""
    model = manifest["model"]
    return {"metric": metric, "manifest_id": manifest["id"], "manifest_json": manifest,
            "model_name": model["id"], "model_revision": model.get("revision") or "",
            "model_dtype": dtype_name(loaded_dtype), "esa_version": __version__,
            "mode": manifest["ranking"]["mode"], "topk": int(manifest["ranking"]["topk"])}


def _rank(scores: dict[str, torch.Tensor], partial: dict[str, list[int]] | None, k: int, mode: str,
          largest: bool, include: Any, exclude: Any, weights: dict[str, Any]) -> Any:
    """rank_scores, restricted to the computed coordinates when a metric scored only some."""
    if not partial:
        return rank_scores(scores, k, mode, largest=largest, include=include, exclude=exclude, weights=weights)
    # Uncomputed coordinates hold 0 in the score tensors; they must never be ranked (a 0 would
    # look like the least sensitive weight). Push them past every real score, then drop them.
    fill = float("-inf") if largest else float("inf")
    masked = {}
    for name, flat in partial.items():
        t = torch.full_like(scores[name], fill)
        t.view(-1)[list(flat)] = scores[name].view(-1)[list(flat)]
        masked[name] = t
    ranked = rank_scores(masked, k, mode, largest=largest, include=include, exclude=exclude, weights=weights)
    keep = [i for i, sc in enumerate(ranked.score) if math.isfinite(sc)]
    return type(ranked)(param=[ranked.param[i] for i in keep], flat_index=ranked.flat_index[keep],
                        index=[ranked.index[i] for i in keep], score=ranked.score[keep], rank=ranked.rank[keep],
                        value=ranked.value[keep], mode=ranked.mode, largest=ranked.largest, k=ranked.k,
                        extra=ranked.extra)


def finish_scores(out: Path, manifest: dict[str, Any], model: Any, result: MetricResult,
                  loaded_dtype: torch.dtype, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank, compute stats, write scores.h5 and the exports; shared with `esa reduce`."""
    ranking = {**DEFAULT_RANKING, **manifest.get("ranking", {})}
    outputs = {**DEFAULT_OUTPUTS, **manifest.get("outputs", {})}
    metric = canonical_name(manifest["metric"]["name"])
    k, mode = int(ranking["topk"]), ranking["mode"]
    include, exclude = ranking.get("include") or None, ranking.get("exclude") or None
    weights = dict(model.named_parameters())
    partial = result.extras.get("partial")  # hessian_diag --candidates: only these were computed
    topk = _rank(result.scores, partial, k, mode, True, include, exclude, weights)
    bottomk = _rank(result.scores, partial, k, mode, False, include, exclude, weights)
    stats = compute_stats(result.scores, k)
    attrs = {**score_attrs(manifest, metric, loaded_dtype), **(extra_attrs or {})}
    path = write_score_file(out / "scores.h5", scores=result.scores, topk=topk, bottomk=bottomk,
                            stats=stats, attrs=attrs, accumulators=result.accumulators or None,
                            counts=result.counts, unscored=result.unscored,
                            score_dtype=outputs["score_dtype"], save=outputs["save_scores"],
                            compression=outputs["compression"])
    files = {"scores": str(path)}
    if outputs["export_topk_csv"]:
        files["top_weights_csv"] = str(write_topk_csv(out / "top_weights.csv", topk))
    if outputs["export_stats"]:
        files["stats"] = [str(p) for p in write_stats(out, stats)]
    if outputs["save_plots"]:
        from esa.plots import save_profile_plots

        files["plots"] = [str(p) for p in save_profile_plots(out / "plots", result.scores, topk, stats)]
    if "super_weights" in result.extras:
        atomic_write_json(out / "super_weights.json", result.extras["super_weights"])
        files["super_weights"] = str(out / "super_weights.json")
    top = topk.to_records()[: min(5, len(topk))]
    log.info("top weights: %s", ", ".join(f"{r['param']}:{','.join(map(str, r['index']))}" for r in top))
    return {"metric": metric, "mode": mode, "topk": k, "n_ranked": len(topk), "files": files,
            "unscored": len(result.unscored), "top": top}


class _ResumableFeed:
    """Calibration batches that start where a checkpoint left off and stop on request.

    The stop check happens between batches, so a checkpoint always holds whole batches.
    """

    def __init__(self, calib: torch.Tensor, batch_size: int, device: torch.device, out: Path,
                 manifest_id: str, metric: Any, options: MetricOptions) -> None:
        self.calib, self.batch_size, self.device = calib, batch_size, device
        self.total = math.ceil(len(calib) / batch_size)
        self.start = 0
        self.stopped = False
        self.stop_after = checkpoint.stop_after_batches()
        saved = checkpoint.load(out, manifest_id) if metric.resumable else None
        if saved is not None:
            self.start = int(saved["batches_done"])
            options.batch_offset += self.start  # the probes of the remaining batches stay the same
            options.initial_accumulators = saved["accumulators"]
            options.initial_counts = saved["counts"]
            if saved["generator_state"] is not None and options.generator is not None:
                options.generator.set_state(saved["generator_state"])
            log.info("resuming from the checkpoint after batch %d of %d", self.start, self.total)
        self.done = self.start
        self.resumable = metric.resumable

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Any:
        for batch in batches(self.calib, self.batch_size, self.device, self.start):
            asked = checkpoint.stop_requested() or (
                self.stop_after is not None and self.done - self.start >= self.stop_after)
            # At least one batch per attempt: a stop that came while the model was loading
            # then still makes progress, and the metric always has a batch to return sums for.
            if asked and self.resumable and self.done > self.start:
                self.stopped = True
                return
            yield batch
            self.done += 1


@register_phase(2)
def run_profile(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """Score, rank and write scores.h5 + exports into `out`."""
    seed = int(manifest.get("seed", 0))
    seed_everything(seed)
    section = manifest.get("metric") or {}
    if "name" not in section:
        raise UserError("manifest: $.metric.name is required for phase 2")
    metric = get_metric(section["name"])  # unknown names fail here, before the model loads
    shard = parse_shard(manifest.get("shard"))
    spec, batch_size = data_spec(manifest)
    pool_size = manifest["data"].get("pool_size")
    loaded = load_model(model_spec(manifest))
    if metric.needs_eager_attention:
        _use_eager_attention(loaded.model)
    context = max_positions(loaded.model)
    if spec.seq_len is None:
        spec = replace(spec, seq_len=min(2048, context or 2048))
    if context is not None and spec.seq_len > context:
        raise UserError(f"--seq-len {spec.seq_len} exceeds the model's context of {context} tokens")
    options = _metric_options(section, seed, shard)
    t0 = time.perf_counter()
    n_windows = 0
    feed = None
    if metric.needs_data:
        windows = load_windows(replace(spec, max_samples=None), loaded.tokenizer)
        chosen = select_windows(len(windows.ids), spec.max_samples, pool_size, seed)
        options.batch_offset = shard_batches(len(chosen), *shard, batch_size)[0]
        chosen = shard_slice(chosen, *shard, batch_size=batch_size)
        calib = windows.ids[chosen]
        n_windows = len(calib)
        if n_windows == 0:
            raise UserError(f"shard {shard[0]}/{shard[1]} has no calibration windows")
        log.info("%s on %d calibration windows of %d tokens (seed %d, shard %d/%d)", metric.name,
                 n_windows, spec.seq_len, seed, *shard)
        feed = _ResumableFeed(calib, batch_size, loaded.device, out, manifest["id"], metric, options)
        data_iter = progress(feed, total=feed.total - feed.start, desc=metric.name)
    else:
        data_iter = iter(())
    if metric.resumable:
        options.finalize = False  # the runner finalises (in place) or checkpoints the sums
    result = metric.score(loaded.model, data_iter, options)
    if feed is not None and feed.stopped:
        path = checkpoint.save(out, manifest["id"], result.accumulators, result.counts, feed.done,
                               options.generator.get_state() if options.generator is not None else None)
        raise checkpoint.Preempted(f"stopped after {feed.done} of {feed.total} batches; "
                                   f"checkpoint in {path}; run the same manifest again to resume")
    if metric.resumable:
        result.extras.update(metric.summarize(result.accumulators, result.counts))
        keep = options.keep_accumulators
        result.scores = metric.finalize(result.accumulators, result.counts, loaded.model, inplace=not keep)
        if not keep:
            result.accumulators = {}
    seconds = time.perf_counter() - t0
    extra = {"shard": f"{shard[0]}/{shard[1]}", "n_windows": n_windows, "seed": seed}
    summary = finish_scores(out, manifest, loaded.model, result, loaded.dtype, extra)
    metric_info = {k: v for k, v in result.extras.items() if k != "super_weights"}
    atomic_write_json(out / "profile.json", {**summary, "seconds": seconds, "n_windows": n_windows,
                                             "seq_len": spec.seq_len, "seed": seed, "shard": list(shard),
                                             "unscored": result.unscored, "metric_extras": metric_info})
    checkpoint.remove(out)
    log.info("%s done in %.1f s; scores in %s", metric.name, seconds, summary["files"]["scores"])
    return {**summary, "seconds": seconds}
