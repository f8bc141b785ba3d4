"""Phase 2: score every weight with one metric, rank, and write scores.h5 plus exports."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esa.core import stop
from esa.core.errors import UserError
from esa.core.logs import get_logger, progress
from esa.data.calibration import select_windows, shard_batches, shard_slice
from esa.data.windows import load_windows
from esa.inputs import load_for_job, resolve_seq_len, seed_everything
from esa.model.blocks import checkpoint_blocks
from esa.parallel.env import any_rank, is_rank0, world_size
from esa.parallel.split import local_batches
from esa.profile import checkpoint
from esa.profile.candidates import resolve_candidates
from esa.profile.finish import finish_scores
from esa.profile.metrics import MetricOptions, get_metric
from esa.results.records import ProfileRecord, write_record
from esa.spec.manifest import ProfileManifest, parse_shard

log = get_logger("profile")


def _metric_options(manifest: ProfileManifest, shard: tuple[int, int]) -> MetricOptions:
    # Probes are seeded per global calibration batch (seed, batch index), so shards and resumed
    # jobs draw what the unsharded run draws.
    spec = manifest.metric
    return MetricOptions(probes=spec.probes, include=list(spec.include) or None, exclude=list(spec.exclude) or None,
                         seed=manifest.seed, max_exact_coords=spec.max_exact_coords,
                         candidates=resolve_candidates(spec) or None,
                         generator=torch.Generator().manual_seed(manifest.seed), keep_accumulators=shard[1] > 1,
                         per_sample=spec.per_sample, perturbation=spec.perturbation, candidate_shard=shard)


def _use_eager_attention(model: Any) -> None:
    """Second-order metrics need double backward, which fused SDPA/flash kernels lack."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "eager":
        log.info("switching attention from %s to eager (double backward needs it)", current)
        model.set_attn_implementation("eager")


class _ResumableFeed:
    """This rank's part of each calibration batch (esa.parallel.split), starting where a checkpoint
    left off and stopping on request.

    The stop check happens between batches, so a checkpoint always holds whole batches; in a
    sharded job a stop seen by any rank stops every rank at the same batch.
    """

    def __init__(self, calib: torch.Tensor, batch_size: int, device: torch.device, out: Path,
                 manifest_id: str, metric: Any, options: MetricOptions) -> None:
        self.calib, self.batch_size, self.device = calib, batch_size, device
        self.total = math.ceil(len(calib) / batch_size)
        self.start = 0
        self.stopped = False
        self.stop_after = stop.stop_after_batches()
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
        if self.resumable:
            stop.defer_termination()  # SIGTERM now checkpoints at the next batch instead of ending the job

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Any:
        for batch in local_batches(self.calib, self.batch_size, self.device, self.start):
            asked = any_rank(stop.stop_requested() or (
                self.stop_after is not None and self.done - self.start >= self.stop_after))
            # At least one batch per attempt: a stop that came while the model was loading
            # then still makes progress, and the metric always has a batch to return sums for.
            if asked and self.resumable and self.done > self.start:
                self.stopped = True
                return
            yield batch
            self.done += 1


def _refuse_if_unshardable(metric: Any) -> None:
    if world_size() > 1 and not metric.shardable:
        raise UserError(f"{metric.name} {metric.not_shardable_because}: run it with one rank per job "
                        f"(parallel = {{nodes = 1, gpus_per_node = 1}}) and {metric.shard_instead}")


def _checkpoint_activations(manifest: ProfileManifest, metric: Any, model: Any) -> None:
    if not manifest.parallel.activation_checkpointing:
        return
    if metric.needs_grad and not metric.needs_eager_attention:
        log.info("activation checkpointing: %d decoder blocks recompute their activations in backward",
                 checkpoint_blocks(model))
    else:  # forward-only metrics keep no activations; double backward needs the whole graph
        log.info("activation checkpointing does not apply to %s; running without it", metric.name)


def run_profile(manifest: ProfileManifest, out: Path) -> dict[str, Any]:
    """Score, rank and write scores.h5 + exports into `out` (rank 0 writes; every rank of a sharded
    job runs it)."""
    assert manifest.id is not None
    seed = manifest.seed
    seed_everything(seed)
    metric = get_metric(manifest.metric.name)
    _refuse_if_unshardable(metric)
    shard = parse_shard(manifest.shard)
    batch_size = manifest.data.batch_size
    assert batch_size is not None
    loaded = load_for_job(manifest.model)
    if metric.needs_eager_attention:
        _use_eager_attention(loaded.model)
    _checkpoint_activations(manifest, metric, loaded.model)
    spec = resolve_seq_len(manifest.data, loaded.model)
    options = _metric_options(manifest, shard)
    t0 = time.perf_counter()
    n_windows = 0
    feed = None
    if metric.needs_data:
        windows = load_windows(replace(spec, max_samples=None), loaded.tokenizer)
        chosen = select_windows(len(windows.ids), spec.max_samples, spec.pool_size, seed)
        if metric.shards_data:  # ablation shards its candidates instead
            options.batch_offset = shard_batches(len(chosen), *shard, batch_size)[0]
            chosen = shard_slice(chosen, *shard, batch_size=batch_size)
        calib = windows.ids[chosen]
        n_windows = len(calib)
        if n_windows == 0:
            raise UserError(f"shard {shard[0]}/{shard[1]} has no calibration windows")
        log.info("%s on %d calibration windows of %d tokens (seed %d, shard %d/%d, %d rank(s))", metric.name,
                 n_windows, spec.seq_len, seed, *shard, world_size())
        feed = _ResumableFeed(calib, batch_size, loaded.device, out, manifest.id, metric, options)
        data_iter = progress(feed, total=feed.total - feed.start, desc=metric.name)
    else:
        data_iter = iter(())
    if metric.resumable:
        options.finalize = False  # the runner finalises (in place) or checkpoints the sums
    result = metric.score(loaded.model, data_iter, options)
    if feed is not None and feed.stopped:
        path = checkpoint.save(out, manifest.id, result.accumulators, result.counts, feed.done,
                               options.generator.get_state() if options.generator is not None else None)
        raise stop.Preempted(f"stopped after {feed.done} of {feed.total} batches; "
                             f"checkpoint in {path}; run the same manifest again to resume")
    if metric.resumable:
        metric.merge_ranks(result)
        result.extras.update(metric.summarize(result.accumulators, result.counts))
        keep = options.keep_accumulators
        result.scores = metric.finalize(result.accumulators, result.counts, loaded.model, inplace=not keep)
        if not keep:
            result.accumulators = {}
    seconds = time.perf_counter() - t0
    extra = {"shard": f"{shard[0]}/{shard[1]}", "n_windows": n_windows, "seed": seed}
    summary = finish_scores(out, manifest, loaded.model, result, loaded.dtype, extra)
    metric_info = {k: v for k, v in result.extras.items() if k != "super_weights"}
    if is_rank0():
        write_record(out, ProfileRecord(**{**summary, "unscored": result.unscored}, seconds=seconds,
                                        n_windows=n_windows, seq_len=spec.seq_len, seed=seed, shard=list(shard),
                                        metric_extras=metric_info))
    checkpoint.remove(out)
    log.info("%s done in %.1f s; scores in %s", metric.name, seconds, summary["files"]["scores"])
    return {**summary, "seconds": seconds}
