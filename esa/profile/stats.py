"""Per-tensor summary statistics of sensitivity scores.

Moments (mean, std, excess kurtosis), min, max and the share of score mass in the top-k are
always exact: they are computed in float64, chunk by chunk, so no full-size temporary is
built. Order statistics (p99, p99.9) and the Gini coefficient need the sorted values: they
are exact for tensors of at most ``EXACT_LIMIT`` elements (2**24, about 16.8M -- the same
size as torch.quantile's limit) and, beyond that, are computed on a deterministic uniform
subsample of ``SAMPLE_SIZE`` elements drawn with replacement by a torch.Generator seeded
with ``SAMPLE_SEED`` (the same positions for the same tensor size on every run).
``TensorStats.sampled`` says which case applied.

Definitions: std is the population standard deviation (ddof=0); kurtosis is Fisher's excess
kurtosis m4/m2**2 - 3 with biased central moments (scipy.stats.kurtosis defaults), NaN for
a constant tensor; quantiles interpolate linearly between order statistics (numpy's default
method); Gini = sum_i (2i - n - 1) x_(i) / (n sum x) over ascending x, 0 for an all-zero
tensor (meaningful for non-negative scores, which every ESA metric produces).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from esa.profile.ranking import tensor_topk
from esa.results.tables import TensorStats

__all__ = ["tensor_stats", "compute_stats", "EXACT_LIMIT", "SAMPLE_SIZE", "SAMPLE_SEED"]

EXACT_LIMIT = 1 << 24
SAMPLE_SIZE = 1 << 24
SAMPLE_SEED = 0
_CHUNK = 1 << 22  # elements converted to float64 at a time


def tensor_stats(name: str, scores: torch.Tensor, k: int) -> TensorStats:
    """Statistics of one score tensor; ``k`` sets the top-k used for ``topk_share``."""
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        nan = float("nan")
        return TensorStats(name, 0, nan, nan, nan, nan, nan, nan, nan, 0, nan, nan, False)
    total, m2, m3, m4 = _moments(flat)
    mean = total / n
    kurt = m4 / (m2 * m2) - 3.0 if m2 > 0 else float("nan")
    kk = max(0, min(int(k), n))
    if math.isnan(total):
        share = float("nan")  # NaN scores: the ranking refuses them, the stats show them
    else:
        # Chunked top-k (esa.profile.ranking): torch.topk on a whole CPU tensor would copy it.
        top_sum = float(tensor_topk(flat, kk, name=name)[0].sum()) if kk else 0.0
        share = top_sum / total if total != 0 else float("nan")
    sample, sampled = _order_sample(flat)
    p99, p999 = np.quantile(sample, [0.99, 0.999])
    return TensorStats(
        name=name, numel=n, mean=mean, std=math.sqrt(m2), min=float(flat.min()),
        max=float(flat.max()), p99=float(p99), p99_9=float(p999), kurtosis=kurt,
        topk_k=kk, topk_share=share, gini=_gini_sorted(sample), sampled=sampled,
    )


def _moments(flat: torch.Tensor) -> tuple[float, float, float, float]:
    """Sum and 2nd-4th central moments (divided by n), two chunked float64 passes."""
    n = flat.numel()
    total = 0.0
    for s in range(0, n, _CHUNK):
        total += float(flat[s:s + _CHUNK].double().sum())
    mean = total / n
    m2 = m3 = m4 = 0.0
    for s in range(0, n, _CHUNK):
        d = flat[s:s + _CHUNK].double() - mean
        d2 = d * d
        m2 += float(d2.sum())
        m3 += float((d2 * d).sum())
        m4 += float((d2 * d2).sum())
    return total, m2 / n, m3 / n, m4 / n


def _order_sample(flat: torch.Tensor) -> tuple[np.ndarray, bool]:
    """Sorted float64 values: all of them up to EXACT_LIMIT, else the documented sample."""
    n = flat.numel()
    if n <= EXACT_LIMIT:
        vals = flat
        sampled = False
    else:
        gen = torch.Generator().manual_seed(SAMPLE_SEED)
        pos = torch.randint(0, n, (SAMPLE_SIZE,), generator=gen)
        vals = flat[pos.to(flat.device)]
        sampled = True
    if vals.device.type != "cpu":
        # Sort on the accelerator (fast), then bring the sorted values over once.
        return torch.sort(vals.float()).values.cpu().numpy().astype(np.float64), sampled
    out = vals.float().numpy().astype(np.float64)  # one float64 copy, sorted in place
    out.sort()
    return out, sampled


def _gini_sorted(x: np.ndarray) -> float:
    """Gini coefficient of ascending values x."""
    n = x.size
    total = float(x.sum())
    if n == 0 or total == 0.0:
        return 0.0
    weights = 2.0 * np.arange(1, n + 1, dtype=np.float64) - n - 1
    return float(np.dot(weights, x) / (n * total))


def compute_stats(scores: Mapping[str, torch.Tensor], k: int) -> list[TensorStats]:
    """Statistics of every tensor in ``scores`` (input order), top-k share with ``k``."""
    return [tensor_stats(name, t, k) for name, t in scores.items()]
