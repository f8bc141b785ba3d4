"""Significance of a perturbation's effect against controls and across windows (pure numpy).

* :func:`empirical_p`: one-sided permutation-style p-value of the target Δ against R control
  Δs, ``(1 + #{control >= target}) / (R + 1)``; the smallest possible value is 1/(R+1).
* :func:`z_score`: how many control standard deviations (sample std, ddof=1) the target Δ
  lies above the control mean.
* :func:`paired_bootstrap_ci`: percentile bootstrap CI of the mean per-window ΔNLL
  (perturbed - baseline), resampling windows with replacement so that each window's pair
  stays together.
* :func:`summarize_controls`: the ``{deltas, p_value, z, ...}`` entry of perturbation.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["empirical_p", "z_score", "paired_bootstrap_ci", "BootstrapCI", "summarize_controls"]

# Bootstrap resamples drawn per block, bounding memory to about this many indices at once.
_BLOCK_ELEMENTS = 1 << 22


def _controls(control_deltas: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(control_deltas, dtype=np.float64).reshape(-1)
    if np.isnan(arr).any():
        raise ValueError("control deltas contain NaN; drop or resolve non-finite runs first")
    return arr


def empirical_p(target_delta: float, control_deltas: Sequence[float] | np.ndarray) -> float:
    """(1 + #{control >= target}) / (R + 1), one-sided ("the target hurts more").

    +inf counts as larger than any finite value; with R = 0 controls the p-value is 1.
    Raises ValueError on a NaN target or NaN controls (a NaN cannot be ordered).
    """
    if math.isnan(float(target_delta)):
        raise ValueError("target delta is NaN")
    c = _controls(control_deltas)
    return float((1 + np.count_nonzero(c >= float(target_delta))) / (c.size + 1))


def z_score(target_delta: float, control_deltas: Sequence[float] | np.ndarray) -> float:
    """(target - mean(controls)) / std(controls, ddof=1).

    Degenerate cases, chosen so the sign stays meaningful: with fewer than 2 controls the
    spread is unknown -> nan; when the controls all agree (std = 0) the result is +inf or
    -inf if the target differs from them and nan if it equals them. Non-finite controls
    (an Inf Δ) make the mean/std non-finite and the result nan.
    """
    c = _controls(control_deltas)
    t = float(target_delta)
    if c.size < 2 or math.isnan(t) or not np.isfinite(c).all():
        return float("nan")
    mean = float(c.mean())
    std = float(c.std(ddof=1))
    diff = t - mean
    if std == 0.0:
        return float("nan") if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / std


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap confidence interval of the mean ΔNLL."""

    mean: float  # observed mean of perturbed - baseline over windows
    low: float
    high: float
    alpha: float
    n_boot: int
    n_windows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def paired_bootstrap_ci(
    baseline_per_window: Sequence[float] | np.ndarray,
    perturbed_per_window: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    weights: Sequence[float] | np.ndarray | None = None,
) -> BootstrapCI:
    """Percentile bootstrap CI of the mean paired difference perturbed - baseline.

    Windows are resampled with replacement (n_boot times, numpy ``default_rng(seed)``);
    each resample's statistic is the mean difference, or the ``weights``-weighted mean
    (e.g. predicted tokens per window, so that the statistic is the per-token ΔNLL).
    The CI is the alpha/2 and 1 - alpha/2 quantiles (linear interpolation) of those means.
    """
    base = np.asarray(baseline_per_window, dtype=np.float64).reshape(-1)
    pert = np.asarray(perturbed_per_window, dtype=np.float64).reshape(-1)
    if base.shape != pert.shape:
        raise ValueError(f"paired windows differ in number: {base.size} baseline, "
                         f"{pert.size} perturbed")
    if base.size == 0:
        raise ValueError("no windows to bootstrap")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    d = pert - base
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != d.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be one non-negative number per window, not all zero")
    observed = float((w * d).sum() / w.sum())
    rng = np.random.default_rng(seed)
    n = d.size
    means = np.empty(n_boot, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = (w[idx] * d[idx]).sum(axis=1) / w[idx].sum(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(observed, float(low), float(high), float(alpha), int(n_boot), int(n))


def summarize_controls(target_delta: float,
                       control_deltas: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The per-control entry of perturbation.json: deltas, p_value, z, and their mean/std.

    NaN control deltas (a broken control run) stay visible in ``deltas`` and are counted
    in ``n_nan``, but are left out of p, z, mean and std. A NaN target gives p = z = nan.
    """
    raw = np.asarray(control_deltas, dtype=np.float64).reshape(-1)
    finite_or_inf = raw[~np.isnan(raw)]
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(finite_or_inf.mean()) if finite_or_inf.size else float("nan")
        std = float(finite_or_inf.std(ddof=1)) if finite_or_inf.size > 1 else float("nan")
    out: dict[str, Any] = {
        "deltas": [float(x) for x in raw],
        "n": int(raw.size),
        "n_nan": int(raw.size - finite_or_inf.size),
        "mean": mean,
        "std": std,
    }
    if math.isnan(float(target_delta)):
        out["p_value"], out["z"] = float("nan"), float("nan")
    else:
        out["p_value"] = empirical_p(target_delta, finite_or_inf)
        out["z"] = z_score(target_delta, finite_or_inf)
    return out
