"""The statistics the analysis computes itself: hand-computable cases and scipy cross-checks.

(esa.results.overlap's Jaccard / overlap coefficient / Spearman / Kendall are tested in
test_overlap.py; here the analysis' grouping and aggregation of them are.)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.collect import collect_jobs
from analysis.delta_ppl import condition_summary, delta_table, distribution_summary
from analysis.overlap_tables import cross_metric_overlap, stats_rank_correlation
from analysis.stability import seed_stability, shard_stability, stability_table
from analysis.super_weights import rank_in_tensor, super_weight_table
from fixtures.synthetic import example_run


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    example_run(root)
    return collect_jobs(root)


def test_distribution_summary_by_hand_and_scipy():
    s = distribution_summary([1.0, 2.0, 3.0, 4.0, None, float("inf")])
    assert s["n"] == 6 and s["n_nonfinite"] == 2
    assert s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["median"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, n - 1 = 3
    assert s["q05"] == pytest.approx(1.15)  # linear: position 0.05 * 3 = 0.15 past 1
    assert s["q95"] == pytest.approx(3.85)
    x = [1.0, 2.0, 3.0, 4.0]
    d = stats.describe(x)
    assert s["mean"] == pytest.approx(d.mean) and s["std"] == pytest.approx(math.sqrt(d.variance))
    q = stats.mstats.mquantiles(x, prob=[0.05, 0.5, 0.95], alphap=1, betap=1)  # type-7 = linear
    assert [s["q05"], s["median"], s["q95"]] == pytest.approx(list(q))


def test_distribution_summary_degenerate():
    one = distribution_summary([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["std"])
    none = distribution_summary([None, None])
    assert none["n_nonfinite"] == 2 and math.isnan(none["mean"])


def test_stats_rank_correlation_by_hand_and_scipy():
    a = {"x": 1.0, "y": 2.0, "z": 3.0, "only_a": 9.0, "nan": float("nan")}
    b = {"x": 1.0, "y": 3.0, "z": 2.0, "only_b": 0.0, "nan": 1.0}
    rho, tau, n = stats_rank_correlation(a, b)
    assert n == 3
    assert rho == pytest.approx(1 - 6 * 2 / (3 * (9 - 1)))  # d = (0, 1, 1)
    assert tau == pytest.approx((2 - 1) / 3)  # 2 concordant, 1 discordant pair
    assert rho == pytest.approx(stats.spearmanr([1, 2, 3], [1, 3, 2]).statistic)
    assert tau == pytest.approx(stats.kendalltau([1, 2, 3], [1, 3, 2]).statistic)
    assert stats_rank_correlation({"x": 1.0, "y": 1.0}, {"x": 1.0, "y": 2.0})[:2] == (None, None)
    assert stats_rank_correlation({"x": 1.0}, {"x": 1.0})[:2] == (None, None)


def test_rank_in_tensor_by_hand_and_scipy():
    t = np.array([[3.0, 1.0], [3.0, 2.0]])
    assert rank_in_tensor(t, (0, 0)) == (1, 3.0)  # ties share the best rank
    assert rank_in_tensor(t, (1, 1)) == (3, 2.0)
    assert rank_in_tensor(t, (0, 1)) == (4, 1.0)
    assert rank_in_tensor(t, (2, 0)) is None and rank_in_tensor(t, (0,)) is None
    ranks = stats.rankdata(-t.reshape(-1), method="min").reshape(t.shape)
    for ix in np.ndindex(t.shape):
        assert rank_in_tensor(t, ix)[0] == ranks[ix]


def test_seed_stability_by_hand(jobs):
    groups = {(g.metric, g.mode): g for g in seed_stability(jobs)}
    g = groups[("grad_x_weight", "per_layer")]
    assert [m["key"] for m in g.members] == [0, 1, 2]
    # Top-1 per tensor: S0 = {a, b, c}, S1 = {a, b', c}, S2 = {a', b, c}.
    jac = g.by["parameter"]["jaccard_all"]
    assert jac == pytest.approx([2 / 4, 2 / 4, 1 / 5])
    assert g.by["parameter"]["jaccard_mean"] == pytest.approx(0.4)
    assert g.by["parameter"]["jaccard_std"] == pytest.approx(np.std([0.5, 0.5, 0.2]))
    assert g.by["parameter"]["jaccard_std"] == pytest.approx(math.sqrt(0.02))
    assert g.by["tensor"]["jaccard_mean"] == 1.0 and g.by["layer"]["jaccard_mean"] == 1.0
    # A deterministic metric: identical sets. Every listed score is 1.0 (a constant vector),
    # so the rank correlations are undefined rather than 1.
    mag = groups[("magnitude", "per_layer")].by["parameter"]
    assert mag["jaccard_all"] == [1.0] and mag["spearman_mean"] is None
    table = stability_table(list(groups.values())).set_index("metric")
    assert table.loc["grad_x_weight", "jaccard_mean_parameter"] == pytest.approx(0.4)
    assert table.loc["grad_x_weight", "runs"] == 3
    # The failed, truncated and sharded jobs do not take part.
    assert set(table.index) == {"grad_x_weight", "magnitude"}


def test_shard_stability_by_hand(jobs):
    (g,) = shard_stability(jobs)
    assert [m["key"] for m in g.members] == ["0/2", "1/2"]
    assert g.by["parameter"]["jaccard_all"] == pytest.approx([2 / 4])


def test_cross_metric_overlap_by_hand(jobs):
    (g,) = cross_metric_overlap(jobs)
    assert (g.model, g.mode) == ("tiny", "per_layer")
    # grad_squared is corrupt and act_mag failed: only three metrics, seed 0, full data.
    assert g.metrics == ["grad_x_weight", "magnitude", "super_weight"]
    assert all(j["seed"] == 0 for j in g.jobs)
    jac = g.matrices["parameter"]["jaccard"]
    assert jac.loc["grad_x_weight", "magnitude"] == pytest.approx(1 / 5)
    assert jac.loc["magnitude", "grad_x_weight"] == pytest.approx(1 / 5)
    assert jac.loc["grad_x_weight", "super_weight"] == 0.0
    assert jac.loc["magnitude", "super_weight"] == pytest.approx(1 / 4)
    assert jac.loc["magnitude", "magnitude"] == 1.0
    ov = g.matrices["parameter"]["overlap_coefficient"]
    assert ov.loc["grad_x_weight", "magnitude"] == pytest.approx(1 / 3)
    assert ov.loc["magnitude", "super_weight"] == pytest.approx(1 / 2)
    # super_weight scores the two down projections only: tensor Jaccard 2/3.
    assert g.matrices["tensor"]["jaccard"].loc["grad_x_weight", "super_weight"] == pytest.approx(2 / 3)
    # Full-tensor means (0.01 * (flat + 1), one entry replaced by 1.0), tensors in the
    # order layer 0, layer 1, lm_head: grad replaces 0.01, 0.01, 0.01; magnitude replaces
    # 0.01, 0.06, 0.04.
    grad = [(0.21 - 0.01 + 1) / 6, (0.21 - 0.01 + 1) / 6, (0.10 - 0.01 + 1) / 4]
    mag = [(0.21 - 0.01 + 1) / 6, (0.21 - 0.06 + 1) / 6, (0.10 - 0.04 + 1) / 4]
    tm = {(p["a"], p["b"]): p for p in g.tensor_mean}
    assert tm[("grad_x_weight", "magnitude")]["n_tensors"] == 3
    # Ranks (1.5, 1.5, 3) against (2, 1, 3): rho = 1.5 / sqrt(1.5 * 2) = sqrt(3) / 2.
    assert tm[("grad_x_weight", "magnitude")]["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert tm[("grad_x_weight", "magnitude")]["spearman"] == pytest.approx(
        stats.spearmanr(grad, mag).statistic)
    assert tm[("grad_x_weight", "magnitude")]["kendall"] == pytest.approx(
        stats.kendalltau(grad, mag).statistic)


def test_condition_summary_by_hand(jobs):
    res = delta_table(jobs)
    summary = condition_summary(res.table)
    zero_k1 = summary[(summary["perturbation"] == "zero") & (summary["k"] == 1)].iloc[0]
    assert zero_k1["seeds"] == 2
    assert zero_k1["delta_ppl_mean"] == 12.0
    assert zero_k1["delta_ppl_std"] == pytest.approx(math.sqrt(8))  # (10 - 12)² + (14 - 12)², n - 1 = 1
    assert zero_k1["delta_ppl_std"] == pytest.approx(stats.tstd([10.0, 14.0]))
    flip = summary[summary["perturbation"] == "sign_flip"].iloc[0]
    assert flip["n_nonfinite"] == 1 and math.isnan(flip["delta_ppl_mean"])


def test_super_weight_rank_from_full_scores(jobs):
    table = super_weight_table(jobs)
    assert len(table) == 1
    row = table.iloc[0]
    # Not in grad_x_weight's per_layer top-1 (that is [0, 0] with score 1.0); in the full
    # tensor 0.01 * (flat + 1) the flat index 5 -> 0.06 is beaten only by the top.
    assert row["weight"] == "model.layers.1.mlp.down_proj.weight:1,2"
    assert row["grad_rank_in_tensor"] == 2
    assert row["grad_score"] == pytest.approx(0.06)
    assert "full scores" in row["grad_rank_note"]
    assert pd.isna(row["grad_rank_global"])
