"""Second-order saliency (Optimal Brain Damage): obd and fisher_obd.

Zeroing weight i moves it by -w_i. A second-order Taylor expansion of the loss around the
trained point gives ΔL ≈ -g_i·w_i + ½·H_ii·w_i² (+ off-diagonal terms OBD ignores). At a trained
point g ≈ 0, so the saliency is the curvature term (LeCun et al. 1990):

* ``obd`` = ½·w²·|diag H|, with diag H the Hutchinson estimate (hutchinson_diag's sums, so data
  shards, probes and resumption work the same way) or, with candidates, the exact diagonal of
  those coordinates (hessian_diag's one-hot Hessian-vector products);
* ``fisher_obd`` = ½·w²·F_ii with F the empirical Fisher: the mean of squared gradients, of
  per-batch mean losses (the grad_squared accumulator) or, with ``per_sample``, of each window's
  own mean loss (one backward per window).

The absolute value of the Hessian diagonal keeps the score a magnitude, as hutchinson_diag does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from esa.core.errors import UserError
from esa.parallel.split import LocalBatch, as_local
from esa.profile.metrics.base import Metric, MetricOptions, MetricResult, start_counts, start_sum
from esa.profile.metrics.curvature import HessianDiag, HutchinsonDiag
from esa.profile.metrics.gradient import fold_gradients, scored_parameters, scoring_mode, sum_dtype
from esa.spec.weights import parse_weight

__all__ = ["OBD", "FisherOBD", "half_w_squared"]


def half_w_squared(scores: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Multiply each fp32 score tensor in place by ½·w² of its parameter; returns the same dict."""
    with torch.no_grad():
        for name, t in scores.items():
            try:
                w = model.get_parameter(name).detach().to(device=t.device, dtype=t.dtype)
            except AttributeError:
                raise UserError(f"accumulators name parameter '{name}', which the model does not have") from None
            t.mul_(w).mul_(w).mul_(0.5)
    return scores


class OBD(Metric):
    """½·w²·|diag H| (Hutchinson estimate of diag H; exact on candidates)."""

    name = "obd"
    resumable = True
    needs_grad = True
    needs_eager_attention = True
    shardable = False  # hutchinson_diag's / hessian_diag's double backward

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Hutchinson sums (hz_sum, hz_sq_sum) over every selected parameter, or with candidates the
        exact Σ_b diag H_b of those coordinates (h_diag_sum); finalised to ½·w²·|diag H|."""
        inner = HessianDiag() if options.candidates else HutchinsonDiag()
        raw = inner.score(model, batches, dataclasses.replace(options, finalize=False))
        extras = dict(raw.extras)
        if options.finalize and "hz_sum" in raw.accumulators:
            extras.update(self.summarize(raw.accumulators, raw.counts))
        if "candidates" in extras:  # the exact H_ii per candidate, with its OBD saliency
            params = dict(model.named_parameters())
            for c in extras["candidates"]:
                name, index = parse_weight(c["weight"])
                w = float(params[name].detach()[index])
                c["obd"] = 0.5 * w * w * abs(c["hessian_diag"])
        return self.package(raw.accumulators, raw.counts, model, options, extras)

    def summarize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, Any]) -> dict[str, Any]:
        """The Hutchinson estimator's spread (exact diagonals have none)."""
        return HutchinsonDiag().summarize(accumulators, counts) if "hz_sum" in accumulators else {}

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module, inplace: bool = False) -> dict[str, torch.Tensor]:
        """½·w²·|diag H| from either accumulator (the model gives w)."""
        inner = HessianDiag() if "h_diag_sum" in accumulators else HutchinsonDiag()
        # Without inplace the diagonal is a new tensor (never the sums), so scaling it is safe.
        return half_w_squared(inner.finalize(accumulators, counts, inplace=inplace), model)


def _windows(batches: Iterable[torch.Tensor | LocalBatch], per_sample: bool, seen: list[int]
             ) -> Iterator[torch.Tensor]:
    """The batches, or (per_sample) each window of each batch as a batch of one; counts batches in seen[0]
    (one rank: a LocalBatch is the whole batch)."""
    for item in batches:
        batch = as_local(item).ids
        seen[0] += 1
        if per_sample:
            yield from batch.split(1)
        else:
            yield batch


class FisherOBD(Metric):
    """½·w²·F_ii, F the empirical Fisher: mean squared gradient of batch (or, per_sample, window) losses."""

    name = "fisher_obd"
    resumable = True
    needs_grad = True
    # FSDP2 averages gradients over ranks: a per-window gradient would become a mean over ranks' windows.
    shardable = False
    not_shardable_because = ("needs each window's (or batch's) own whole gradient and weight, which an "
                             "FSDP2-sharded model averages over ranks and splits")

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Accumulator `grad_sq_sum` = Σ_s (∇W L_s)² over gradient samples s (batches, or windows with
        per_sample); counts: batches, tokens, samples (the divisor) and the per_sample setting."""
        params = scored_parameters(model, options)
        acc = {n: start_sum(options, "grad_sq_sum", n, p, sum_dtype(p.dtype)) for n, p in params.items()}

        def fold(name: str, grad: torch.Tensor) -> None:
            g = grad if grad.dtype == acc[name].dtype else grad.to(acc[name].dtype)
            acc[name].addcmul_(g, g)

        seen = [0]
        with scoring_mode(model, params):
            done = fold_gradients(model, _windows(batches, options.per_sample, seen), params, fold, options.progress)
        counts = start_counts(options, {"batches": seen[0], "tokens": done["tokens"], "samples": done["batches"],
                                        "per_sample": int(options.per_sample)})
        return self.package({"grad_sq_sum": acc}, counts, model, options)

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module, inplace: bool = False) -> dict[str, torch.Tensor]:
        """½·w²·grad_sq_sum / samples per parameter, fp32."""
        samples = int(counts.get("samples", 0))
        if samples <= 0:
            raise UserError(f"accumulator counts have no samples: {counts}")
        with torch.no_grad():
            fisher = {name: (s.div_(samples) if inplace else s / samples).float()
                      for name, s in accumulators["grad_sq_sum"].items()}
        return half_w_squared(fisher, model)
