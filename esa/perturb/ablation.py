"""ablation: the ground truth the sensitivity metrics estimate.

For each candidate weight alone: perturb it in place (zero by default; any registered
perturbation), evaluate the mean next-token NLL of the job's calibration windows, restore the
weight bit-exactly (esa.perturb.perturbations), and record

    ΔNLL = mean NLL(perturbed) - mean NLL(unperturbed)

(the score; every window predicts the same number of tokens, so it is also the mean of the
per-window ΔNLL), ΔPPL = exp(NLL + ΔNLL) - exp(NLL), and a summary of the per-window ΔNLL. A
perturbation that makes the loss NaN/Inf scores +inf (flagged in the non_finite column).

Fast path (esa.perturb.cached_forward): candidates are grouped by the block they live in; the
outputs of the blocks before it are computed once per group (each group's from the previous one's) and
each candidate runs only the rest of the model. The first candidate of each group is checked against a
full forward of the first calibration window.

Shards (``--shard i/n``) split the candidate list into n contiguous slices; every shard evaluates
all calibration windows, so `esa reduce` merges shards by concatenating their rows. A random
perturbation draws from a generator seeded by (seed, the candidate's position in the whole list),
so shards draw what an unsharded run draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from esa.core.errors import UserError
from esa.core.logs import get_logger, progress
from esa.parallel.split import as_local
from esa.perturb.cached_forward import CachedForward
from esa.perturb.perturbations import cpu_generator, perturbation_from_spec, perturbed
from esa.perturb.targets import WeightTarget, resolve_targets
from esa.profile.metrics.base import Metric, MetricOptions, MetricResult
from esa.results.tables import CandidateScores
from esa.spec.manifest import PerturbationSpec

__all__ = ["Ablation", "ABLATION_CSV", "candidate_slice"]

log = get_logger("ablation")

ABLATION_CSV = "ablation.csv"
# The first forward from a cached start must equal a full forward of one window to this tolerance
# (relative); a batch of one may take other matmul kernels than the job's batches, hence not zero.
_CHECK_RTOL = 1e-5


def candidate_slice(n_candidates: int, shard: int, n_shards: int) -> list[int]:
    """Positions (in the whole candidate list) that shard `shard` of `n_shards` evaluates: a contiguous slice."""
    return torch.tensor_split(torch.arange(n_candidates), n_shards)[shard].tolist()


class Ablation(Metric):
    """ΔNLL of the calibration windows when each candidate alone is perturbed (exact, not estimated)."""

    name = "ablation"
    shards_data = False
    shardable = False
    not_shardable_because = "perturbs single weights of a whole model one at a time, which FSDP2 splits over ranks"
    shard_instead = "split the candidates over jobs with shard = 'i/n', then merge them with `esa reduce`"

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Sparse scores of this shard's candidates (result.candidates); nothing dense."""
        if not options.candidates:
            raise UserError("ablation scores a candidate set: give --candidates-from SCORES.h5|super_weights.json|"
                            "targets.csv with --candidates N, or --candidates PARAM:I,J")
        spec = options.perturbation if options.perturbation is not None else PerturbationSpec("zero")
        pert = perturbation_from_spec(spec)
        targets = resolve_targets(model, options.candidates)
        mine = candidate_slice(len(targets), *options.candidate_shard)
        seed = options.seed or 0
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            windows = [as_local(b).ids for b in batches]  # one rank: a LocalBatch is the whole batch
            fwd = CachedForward(model, windows)
            rows, starts, checks = self._evaluate(model, fwd, targets, mine, pert, seed)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - t0
        predicted = int(windows[0].shape[1]) - 1
        table = _table(targets, mine, rows, fwd.baseline, predicted)
        base_nll = float(fwd.baseline.sum() / (len(fwd.baseline) * predicted))
        table.attrs.update(baseline_nll=base_nll, baseline_ppl=math.exp(base_nll), n_windows=len(fwd.baseline),
                           tokens_per_window=predicted, n_candidates=len(targets),
                           shard=f"{options.candidate_shard[0]}/{options.candidate_shard[1]}", seed=seed,
                           perturbation=spec.to_json(2))
        extras: dict[str, Any] = {
            "n_candidates": len(targets), "n_evaluated": len(mine), "seconds": seconds,
            "candidates_per_second": len(mine) / seconds if seconds > 0 else None,
            "baseline_nll": base_nll, "perturbation": spec.to_json(2),
            "candidates_by_blocks_skipped": {str(k): v for k, v in sorted(starts.items())},
            "fast_path_check": {str(k): v for k, v in sorted(checks.items())}}
        log.info("ablation: %d candidates in %.1f s (%.3g per second); baseline NLL %.6g", len(mine), seconds,
                 extras["candidates_per_second"] or float("nan"), base_nll)
        return MetricResult({}, extras=extras, candidates=table)

    def _evaluate(self, model: torch.nn.Module, fwd: CachedForward, targets: list[WeightTarget], mine: list[int],
                  pert: Any, seed: int) -> tuple[dict[int, tuple[np.ndarray, float, float, int]], dict[int, int],
                                                 dict[int, float]]:
        """Per candidate position: (per-window NLL sums, old value, new value, blocks skipped)."""
        params = dict(model.named_parameters())
        groups: dict[int, list[int]] = {}
        for pos in mine:
            groups.setdefault(fwd.start_of(params[targets[pos].param]), []).append(pos)
        rows: dict[int, tuple[np.ndarray, float, float, int]] = {}
        checks: dict[int, float] = {}
        counts = {start: len(group) for start, group in groups.items()}
        order = [(start, pos) for start in sorted(groups) for pos in groups[start]]
        verified: dict[int, int] = {}  # start -> the start actually used after its check
        for start, pos in progress(order, total=len(order), desc="ablation"):
            use = verified.get(start, start)
            with perturbed(model, [targets[pos]], pert, cpu_generator(seed * 1_000_003 + pos)) as applied:
                sums = fwd.nll_sums(use)
                if start > 0 and start not in verified:  # the shortcut against a full forward of window 0
                    full = fwd.first_window_full()
                    diff = abs(full - sums[0]) / max(1.0, abs(full)) if math.isfinite(full) else 0.0
                    checks[start] = diff
                    same = bool(np.isclose(sums[0], full, rtol=_CHECK_RTOL, atol=0.0, equal_nan=True))
                    verified[start] = start if same else 0
                    if not same:
                        log.warning("ablation: a forward that skips %d blocks differs from the full forward "
                                    "(relative %.2g); weights of that group are evaluated with full forwards",
                                    start, diff)
                        sums = fwd.nll_sums(0)
                record = applied.records()[0]
            rows[pos] = (sums, record["old"], record["new"], verified.get(start, start))
        return rows, counts, checks


def _table(targets: list[WeightTarget], mine: list[int], rows: dict[int, tuple[np.ndarray, float, float, int]],
           baseline: np.ndarray, predicted: int) -> CandidateScores:
    base_nll = float(baseline.sum() / (len(baseline) * predicted))
    cols: dict[str, list[float]] = {k: [] for k in (
        "delta_nll", "delta_ppl", "window_delta_nll_std", "window_delta_nll_min", "window_delta_nll_median",
        "window_delta_nll_max", "windows_worse", "non_finite", "new_value", "blocks_skipped")}
    scores, values = [], []
    for pos in mine:
        sums, old, new, start = rows[pos]
        with np.errstate(invalid="ignore", over="ignore"):
            per_window = (sums - baseline) / predicted
            finite = bool(np.isfinite(per_window).all())
            dnll = float(per_window.mean()) if finite else math.inf
        try:
            dppl = math.exp(base_nll + dnll) - math.exp(base_nll)
        except OverflowError:
            dppl = math.inf
        cols["delta_nll"].append(dnll)
        cols["delta_ppl"].append(dppl)
        if finite:
            cols["window_delta_nll_std"].append(float(per_window.std(ddof=1)) if len(per_window) > 1 else math.nan)
            for key, fn in (("min", np.min), ("median", np.median), ("max", np.max)):
                cols[f"window_delta_nll_{key}"].append(float(fn(per_window)))
            cols["windows_worse"].append(float((per_window > 0).mean()))
        else:
            for key in ("std", "min", "median", "max"):
                cols[f"window_delta_nll_{key}"].append(math.nan)
            cols["windows_worse"].append(math.nan)
        cols["non_finite"].append(0.0 if finite else 1.0)
        cols["new_value"].append(new)
        cols["blocks_skipped"].append(float(start))
        scores.append(dnll)
        values.append(old)
    chosen = [targets[p] for p in mine]
    return CandidateScores([t.param for t in chosen], [t.flat_index for t in chosen], [t.index for t in chosen],
                           scores, values, mine, {k: np.asarray(v) for k, v in cols.items()}, {}, ABLATION_CSV)
