"""Significance: empirical p, z-score and the paired bootstrap CI, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import esa.perturb.significance as sig
from esa.perturb.significance import empirical_p, paired_bootstrap_ci, summarize_controls, z_score


def test_empirical_p_hand_cases() -> None:
    assert empirical_p(5.0, [1, 2, 5, 6]) == pytest.approx(3 / 5)  # 5 and 6 are >= 5
    assert empirical_p(10.0, [1, 2, 5, 6]) == pytest.approx(1 / 5)  # the smallest: 1/(R+1)
    assert empirical_p(-1.0, [1, 2, 5, 6]) == 1.0
    assert empirical_p(3.0, []) == 1.0
    assert empirical_p(1e9, [math.inf]) == 1.0  # an Inf control beats any finite target
    assert empirical_p(math.inf, [1.0, math.inf]) == pytest.approx(2 / 3)
    assert empirical_p(2.0, np.zeros(100)) == pytest.approx(1 / 101)
    with pytest.raises(ValueError):
        empirical_p(float("nan"), [1.0])
    with pytest.raises(ValueError):
        empirical_p(1.0, [1.0, float("nan")])


def test_empirical_p_is_a_valid_p_value_under_the_null() -> None:
    # Under exchangeability P(p <= a) <= a; with continuous data it is exactly floor(a(R+1))/(R+1).
    rng = np.random.default_rng(0)
    r = 19
    ps = np.array([empirical_p(x[0], x[1:]) for x in rng.normal(size=(4000, r + 1))])
    for a in (0.05, 0.1, 0.5):
        expected = math.floor(a * (r + 1)) / (r + 1)
        assert abs((ps <= a + 1e-12).mean() - expected) < 4 * math.sqrt(expected / 4000)


def test_z_score_hand_cases() -> None:
    # mean 2.5, sample std sqrt(5/3)
    assert z_score(5.0, [1, 2, 3, 4]) == pytest.approx(2.5 / math.sqrt(5 / 3), rel=1e-12)
    assert z_score(0.0, [1, 2, 3, 4]) == pytest.approx(-2.5 / math.sqrt(5 / 3), rel=1e-12)
    c = np.random.default_rng(1).normal(3.0, 2.0, size=50)
    assert z_score(7.0, c) == pytest.approx((7.0 - c.mean()) / stats.tstd(c), rel=1e-12)
    assert z_score(3.0, [2, 2, 2]) == math.inf
    assert z_score(1.0, [2, 2, 2]) == -math.inf
    assert math.isnan(z_score(2.0, [2, 2, 2]))
    assert math.isnan(z_score(2.0, [1.0]))
    assert math.isnan(z_score(2.0, [1.0, math.inf]))


def test_bootstrap_constant_difference_has_zero_width() -> None:
    base = np.array([3.0, 4.0, 5.5, 2.25])
    ci = paired_bootstrap_ci(base, base + 0.5, n_boot=300)
    assert ci.mean == ci.low == ci.high == 0.5
    assert ci.n_windows == 4 and ci.n_boot == 300


def test_bootstrap_two_windows_support() -> None:
    # Resampled means of d = (0, 1) take values 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4.
    ci = paired_bootstrap_ci([0.0, 0.0], [0.0, 1.0], n_boot=4000, alpha=0.2, seed=3)
    assert ci.mean == 0.5 and ci.low == 0.0 and ci.high == 1.0
    ci = paired_bootstrap_ci([0.0, 0.0], [0.0, 1.0], n_boot=4000, alpha=0.6, seed=3)
    assert ci.low == ci.high == 0.5  # 30% and 70% quantiles both fall on 1/2


def test_bootstrap_matches_scipy_and_normal_theory() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(3.0, 0.3, size=60)
    pert = base + rng.normal(0.2, 0.1, size=60)
    ci = paired_bootstrap_ci(base, pert, n_boot=20000, seed=1)
    d = pert - base
    assert ci.mean == pytest.approx(d.mean(), rel=1e-12)
    ref = stats.bootstrap((d,), np.mean, n_resamples=20000, method="percentile",
                          confidence_level=0.95, random_state=np.random.default_rng(2))
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert ci.low == pytest.approx(ref.confidence_interval.low, abs=0.05 * se)
    assert ci.high == pytest.approx(ref.confidence_interval.high, abs=0.05 * se)
    assert (ci.high - ci.low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert ci.low < d.mean() < ci.high


def test_bootstrap_deterministic_blocked_and_weighted(monkeypatch) -> None:
    rng = np.random.default_rng(5)
    base, pert = rng.normal(size=30), rng.normal(size=30)
    a = paired_bootstrap_ci(base, pert, n_boot=500, seed=9)
    monkeypatch.setattr(sig, "_BLOCK_ELEMENTS", 30 * 7)  # resample in blocks of 7
    b = paired_bootstrap_ci(base, pert, n_boot=500, seed=9)
    assert a == b
    assert paired_bootstrap_ci(base, pert, n_boot=500, seed=10) != a
    # Equal weights change nothing; unequal ones give the token-weighted mean.
    assert paired_bootstrap_ci(base, pert, n_boot=500, seed=9, weights=np.full(30, 4.0)) == a
    w = rng.integers(1, 10, size=30).astype(float)
    cw = paired_bootstrap_ci(base, pert, n_boot=500, seed=9, weights=w)
    assert cw.mean == pytest.approx(((pert - base) * w).sum() / w.sum(), rel=1e-12)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(base, pert[:-1])
    with pytest.raises(ValueError):
        paired_bootstrap_ci(base, pert, alpha=1.5)


def test_summarize_controls_keys_and_nan_handling() -> None:
    s = summarize_controls(4.0, [1.0, 2.0, float("nan"), 3.0])
    assert set(s) >= {"deltas", "p_value", "z"}
    assert s["n"] == 4 and s["n_nan"] == 1 and math.isnan(s["deltas"][2])
    assert s["p_value"] == pytest.approx(1 / 4)
    assert s["z"] == pytest.approx((4.0 - 2.0) / 1.0)
    assert s["mean"] == 2.0 and s["std"] == 1.0
    s = summarize_controls(float("nan"), [1.0, 2.0])
    assert math.isnan(s["p_value"]) and math.isnan(s["z"])
