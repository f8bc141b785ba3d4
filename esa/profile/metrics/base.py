"""The metric interface and registry.

A metric turns a model and a stream of calibration batches into one fp32 score tensor per
scored parameter (same shape as the parameter). Adding a metric is one class, its entry in
esa.spec.names.METRICS and one test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from esa.core.errors import UserError
from esa.results.tables import CandidateScores


@dataclass
class MetricResult:
    """What a metric produced.

    scores: parameter name -> fp32 score tensor in the parameter's shape.
    unscored: parameters the metric does not define a score for (e.g. norms for act_mag);
        listed, never silently given zeros.
    accumulators: additive sums (name -> parameter name -> tensor) plus `counts`, so that
        data shards can be summed exactly by a reduce step; empty for data-free metrics.
    extras: metric-specific diagnostics (e.g. Hutchinson spread, super-weight candidates),
        JSON-serialisable.
    candidates: sparse scores of a metric that scores a candidate set only (ablation): then
        `scores` is empty and these rows are the result (esa.results.tables.CandidateScores).
    """

    scores: dict[str, torch.Tensor]
    unscored: list[str] = field(default_factory=list)
    accumulators: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    candidates: CandidateScores | None = None


@dataclass
class MetricOptions:
    """Knobs shared by the metrics; each metric reads the ones it needs."""

    probes: int = 1  # hutchinson_diag: Rademacher probes per batch
    include: list[str] | None = None  # name patterns a metric may restrict itself to
    exclude: list[str] | None = None
    max_exact_coords: int = 4096  # hessian_diag: refuse larger parameter subsets
    generator: torch.Generator | None = None  # seeded RNG (probes)
    # hessian_diag: score only these weights ('param:i,j'); other coordinates of their
    # tensors are not computed (listed in extras['partial']).
    candidates: list[str] | None = None
    # False lets gradient/curvature metrics build their scores inside the accumulator
    # buffers (one fp32 buffer per parameter instead of two) and return no accumulators;
    # shard runs (`--shard i/n`) need True.
    keep_accumulators: bool = True
    progress: Callable[[int], None] | None = None  # called with the number of batches done
    # Resumption (esa/checkpoint.py): start from these sums and counts instead of zeros, so a
    # resumed job adds the remaining batches in the same order as an uninterrupted one.
    initial_accumulators: dict[str, dict[str, torch.Tensor]] | None = None
    initial_counts: dict[str, Any] | None = None
    # Random draws tied to the calibration batch (Hutchinson probes): with `seed` set, batch g of
    # the whole calibration set (g = batch_offset + i) always gets the same probes, so data
    # shards and resumed jobs reproduce the unsharded, uninterrupted run.
    seed: int | None = None
    batch_offset: int = 0
    # False: return the accumulators and counts only (scores={}); the caller finalises. Lets a
    # pre-empted job checkpoint its sums, and the phase-2 runner finalise in place.
    finalize: bool = True
    per_sample: bool = False  # fisher_obd: squared gradients of single windows instead of batches
    perturbation: Any = None  # ablation: the esa.spec.manifest.PerturbationSpec applied to each candidate
    candidate_shard: tuple[int, int] = (0, 1)  # ablation: score only slice i of n of the candidates


# Counts that are settings every batch (and shard) shares, not additive totals.
SETTING_COUNTS = ("probes", "per_sample")


class Metric(ABC):
    """One sensitivity metric."""

    name: str = ""
    needs_data: bool = True
    needs_grad: bool = False
    needs_eager_attention: bool = False
    # False: `--shard i/n` splits something else than the calibration windows (ablation splits
    # its candidates and needs every window in every shard).
    shards_data: bool = True
    # False: the metric cannot run on an FSDP2-sharded model (double backward through FSDP's
    # all-gathers is not supported); a sharded job refuses it before loading the model, saying
    # why (not_shardable_because) and what to do instead (shard_instead).
    shardable: bool = True
    not_shardable_because: str = "needs double backward, which an FSDP2-sharded model does not support"
    shard_instead: str = ("split the calibration windows over jobs with shard = 'i/n', then sum them with "
                          "`esa reduce`")

    @abstractmethod
    def score(
        self,
        model: torch.nn.Module,
        batches: Iterable[torch.Tensor],
        options: MetricOptions,
    ) -> MetricResult:
        """Score every parameter the metric defines; `batches` yields LongTensor [B, T]."""

    resumable: bool = False  # accumulates additive sums that a checkpoint can carry

    def merge_ranks(self, result: MetricResult) -> None:
        """Combine the per-rank sums of a sharded job in place, before finalize (a no-op unless the
        metric keeps sums of its own rank's data; FSDP already reduces gradients)."""

    def summarize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, Any]) -> dict[str, Any]:
        """Diagnostics (extras) computable from the sums alone, e.g. an estimator's spread."""
        return {}

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module, inplace: bool = False) -> dict[str, torch.Tensor]:
        """Turn summed accumulators (e.g. from `esa reduce` over shards) into scores."""
        raise UserError(f"metric '{self.name}' has no additive accumulators to reduce")

    def package(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, Any],
                model: torch.nn.Module, options: MetricOptions,
                extras: dict[str, Any] | None = None) -> MetricResult:
        """The MetricResult of summed accumulators, as options ask: sums only (finalize=False),
        scores plus sums (keep_accumulators), or scores built inside the sum buffers."""
        extras = extras or {}
        if not options.finalize:
            return MetricResult({}, accumulators=accumulators, counts=counts, extras=extras)
        if options.keep_accumulators:
            return MetricResult(self.finalize(accumulators, counts, model),
                                accumulators=accumulators, counts=counts, extras=extras)
        return MetricResult(self.finalize(accumulators, counts, model, inplace=True), counts=counts, extras=extras)


def start_sum(options: MetricOptions, acc_name: str, param: str, like: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh zero sum shaped like `like`, or the resumed one from options.initial_accumulators."""
    from esa.parallel.fsdp import like_param

    initial = (options.initial_accumulators or {}).get(acc_name, {}).get(param)
    if initial is not None:  # a checkpoint holds this rank's part (the whole tensor unsharded)
        return like_param(initial.to(device=like.device, dtype=dtype or like.dtype).clone(), like)
    return torch.zeros_like(like, dtype=dtype or like.dtype)


def start_counts(options: MetricOptions, fresh: dict[str, Any]) -> dict[str, Any]:
    """The counts to continue from: fresh ones, with resumed additive counts added."""
    counts = dict(fresh)
    for key, value in (options.initial_counts or {}).items():
        if isinstance(value, (int, float)) and key in counts and key not in SETTING_COUNTS:
            counts[key] = counts[key] + value
    return counts


def get_metric(name: str) -> Metric:
    """Instantiate a metric by name or alias (esa.spec.names.METRICS); unknown names list the valid ones."""
    from esa.spec.names import METRICS

    return METRICS.load(name)()
