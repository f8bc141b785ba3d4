"""The data-free baseline metric: |W|."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from esa.profile.metrics.base import Metric, MetricOptions, MetricResult
from esa.profile.metrics.gradient import scored_parameters

__all__ = ["Magnitude"]


class Magnitude(Metric):
    """|W| of every selected parameter, in fp32; needs no calibration data."""

    name = "magnitude"
    needs_data = False

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Return |W| per parameter; `batches` is ignored."""
        with torch.no_grad():
            scores = {n: p.detach().abs().float() for n, p in scored_parameters(model, options).items()}
        return MetricResult(scores)
